"""Tiny in-process models (hidden 32, 2 layers, 4 heads, vocab 99, odd intermediate 37)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            vocab_size=99, max_position_embeddings=128)


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    if model_type == "gpt2":
        base = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=128,
                    bos_token_id=98, eos_token_id=98)
    elif model_type == "distilbert":
        base = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=99,
                    max_position_embeddings=128)
    elif model_type == "llama":
        base = dict(TINY, num_key_value_heads=2)
    elif model_type == "albert":
        base = dict(TINY, embedding_size=16)
    else:
        base = dict(TINY)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def tiny_model(model_type: str = "bert", task: str = "sequence-classification", seed: int = 0,
               **overrides):
    import transformers

    from torchbridge.pipeline.loading import TASK_AUTO_CLASS

    auto_cls = getattr(transformers, TASK_AUTO_CLASS[task])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return auto_cls.from_config(tiny_config(model_type, **overrides)).eval()


@pytest.fixture
def tiny_bert():
    return tiny_model("bert", "sequence-classification", num_labels=3)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A local folder holding a tiny BERT classifier and a WordPiece tokenizer for it."""
    from transformers import BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    model = tiny_model("bert", "sequence-classification", num_labels=2)
    model.save_pretrained(path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
        w for w in ("the a this movie is great i didn't like it at all film bad good john works "
                    "google new york in and of to was not very fun boring").split()]
    words += [f"w{i}" for i in range(99 - len(words))]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    return path


def no_compile(**kwargs):
    """A config for fast tests: compile off (compiled cases are tested separately)."""
    from torchbridge.models.text import TextModelConfig

    kwargs.setdefault("use_torch_compile", False)
    kwargs.setdefault("warmup_steps", 1)
    kwargs.setdefault("warmup_seq_len", 16)
    return TextModelConfig(**kwargs)


def _put_in_hf_cache(home: Path, repo_id: str, folder_writer) -> None:
    commit = "0" * 40
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    folder_writer(snapshot)


@pytest.fixture
def tiny_hub_cache(tmp_path, monkeypatch, tiny_bert_dir):
    """A temporary offline Hugging Face cache holding tiny models under the guide's hub names
    (bert-base-uncased, distilbert-base-uncased, dslim/bert-base-NER, gpt2), each with its
    tokenizer, exactly where an offline `from_pretrained` looks for them."""
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

    def distilbert(folder):
        tiny_model("distilbert", "sequence-classification").save_pretrained(folder)
        AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)

    _put_in_hf_cache(home, "distilbert-base-uncased", distilbert)
    _put_in_hf_cache(home, "gpt2", gpt2)
    from huggingface_hub import constants

    # huggingface_hub reads HF_HOME once at import; the cache path is looked up at call time
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home
