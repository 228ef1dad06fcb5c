"""Every ```python example in docs/ runs as written (each page in its own namespace, in order).

The hub names the examples use (bert-base-uncased, distilbert-base-uncased, gpt2) are tiny models
in a temporary offline Hugging Face cache (the `tiny_hub_cache` fixture), so the examples run in
seconds; the README's links point here, not outside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_docs_exist_and_link_only_inside_the_repository():
    names = {p.name for p in PAGES}
    assert {"index.md", "api.md", "modes.md", "precisions.md", "verify.md", "cli.md",
            "architecture.md"} <= names
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (DOCS / target).exists(), f"{page.name} links to a missing {target}"
    readme = (DOCS.parent / "README.md").read_text()
    assert "docs/" in readme and "shared/" not in readme


@pytest.mark.parametrize("page", [p for p in PAGES if _python_blocks(p.read_text())],
                         ids=lambda p: p.name)
def test_every_python_example_runs(page, tiny_hub_cache, monkeypatch):
    monkeypatch.setenv("TORCHBRIDGE_NO_PROGRESS", "1")
    namespace: dict = {}
    for i, block in enumerate(_python_blocks(page.read_text())):
        try:
            exec(compile(block, f"{page.name}-block-{i}", "exec"), namespace)  # noqa: S102
        except Exception as err:  # noqa: BLE001 - name the failing block
            raise AssertionError(f"{page.name} block {i} failed:\n{block}") from err
