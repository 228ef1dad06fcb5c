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
from conftest import tiny_model

GUIDE = Path(__file__).resolve().parents[2] / "shared" / "spec" / "small_model_guide.md"


def _put_in_hf_cache(home: Path, repo_id: str, folder_writer) -> None:
    commit = "0" * 40
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    folder_writer(snapshot)


@pytest.fixture
def guide_cache(tmp_path, monkeypatch, tiny_bert_dir):
    import shutil

    from transformers import AutoTokenizer

    from torchbridge.bench.assets._fetch import AssetUnavailableError
    from torchbridge.bench.assets.gpt2_tokenizer import gpt2_tokenizer_dir

    try:
        gpt2_tok = gpt2_tokenizer_dir()
    except AssetUnavailableError as err:
        pytest.skip(f"the GPT-2 tokenizer is unavailable: {err}")
    home = tmp_path / "hf"

    def bert(kind):
        def write(folder):
            tiny_model("bert", kind, num_labels=9 if kind == "token-classification" else 2
                       ).save_pretrained(folder)
            AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
        return write

    def gpt2(folder):
        tiny_model("gpt2", "causal-lm", vocab_size=50257, bos_token_id=50256,
                   eos_token_id=50256).save_pretrained(folder)
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(gpt2_tok / name, folder / name)

    _put_in_hf_cache(home, "bert-base-uncased", bert("masked-lm"))
    _put_in_hf_cache(home, "dslim/bert-base-NER", bert("token-classification"))
    _put_in_hf_cache(home, "gpt2", gpt2)
    from huggingface_hub import constants

    # huggingface_hub reads HF_HOME once at import; the cache path is looked up at call time
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.skipif(not GUIDE.exists(), reason=f"the guide is not at {GUIDE}")
def test_every_guide_example_runs(guide_cache, capsys):
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
