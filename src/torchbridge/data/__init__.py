"""Work on real data: batched inference over lists of texts, files and Ray Data.

- :mod:`torchbridge.data.inference`: ``encode``, ``predict``, ``generate_text`` over a list of texts
  (tokenization inside, token-budget batches over length-sorted inputs, results in input order).
- :mod:`torchbridge.data.files`: ``torchbridge run`` over JSONL, CSV and Parquet files (streamed,
  sharded, resumable, bad rows to an errors file).
- :mod:`torchbridge.data.ray_engine`: the same work as a callable class for Ray Data's
  ``Dataset.map_batches`` (extra ``torchbridge[ray]``).
"""

from torchbridge.data.inference import encode, generate_text, predict

__all__ = ["encode", "predict", "generate_text"]
