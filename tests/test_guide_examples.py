"""Every Python example of the guide (shared/spec/small_model_guide.md) runs as written.

The guide's hub names (bert-base-uncased, gpt2, dslim/bert-base-NER) are put into a temporary
Hugging Face cache as tiny models, exactly where an offline `from_pretrained` looks for them; the
code blocks are then executed in order in one namespace, as a reader would run them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

GUIDE = Path(__file__).resolve().parents[2] / "shared" / "spec" / "small_model_guide.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.skipif(not GUIDE.exists(), reason=f"the guide is not at {GUIDE}")
def test_every_guide_example_runs(tiny_hub_cache, capsys):
    from transformers import AutoTokenizer

    blocks = _python_blocks(GUIDE.read_text())
    assert len(blocks) >= 15
    tokenizer = AutoTokenizer.from_pretrained("bert-base-uncased")
    inputs = tokenizer(["This movie is great!", "boring"], return_tensors="pt", padding=True)
    # the Quick Start snippets use input_ids / attention_mask from the reader's own code
    namespace = {"torch": torch, "tokenizer": tokenizer, "input_ids": inputs["input_ids"],
                 "attention_mask": inputs["attention_mask"]}
    for i, block in enumerate(blocks):
        if "AutoTokenizer.from_pretrained" not in block:
            namespace["tokenizer"] = tokenizer  # snippets that use "the" tokenizer mean BERT's
        try:
            exec(compile(block, f"guide-block-{i}", "exec"), namespace)  # noqa: S102
        except Exception as err:  # noqa: BLE001 - name the failing block
            raise AssertionError(f"guide block {i} failed:\n{block}") from err
    out = capsys.readouterr().out
    assert "This movie is great! -> " in out  # the classification pipeline printed its labels
    assert namespace["generated"].startswith("The future of AI is")
    info = namespace["optimizer"].get_optimization_info()
    assert info["verify"]["passed"] and info["optimization_mode"] == "throughput"
