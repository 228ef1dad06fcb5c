"""Rows of a table -> result columns: the part the file runner and the Ray engine share.

Given the text column (and, for question answering, the context column) of a block of rows, run
the model's task and return the result columns for the rows that worked and a reason for each row
that did not, so a batch job can write both and go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torchbridge.data.inference import encode_rows, generate_rows, predict_rows

# The model's task -> the columns its results add to a row.
RESULT_COLUMNS = {
    "feature-extraction": ("embedding",),
    "sequence-classification": ("label", "score", "scores"),
    "token-classification": ("entities",),
    "question-answering": ("answer", "score", "start", "end"),
    "causal-lm": ("generated_text",),
}


@dataclass
class Options:
    """How to run the task over a block of rows (the knobs of ``torchbridge run``)."""

    batch_size: int | None = None
    max_batch_tokens: int | None = None
    truncation: bool = True
    normalize: bool = False
    max_new_tokens: int = 50
    generate_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    index: list[int]  # rows (positions in the block) that have results, in increasing order
    columns: dict[str, list[Any]]  # result column -> one value per row of ``index``
    errors: dict[int, str]  # position in the block -> reason


def result_columns(task: str, prefix: str = "") -> list[str]:
    if task not in RESULT_COLUMNS:
        raise ValueError(f"a batch run handles the tasks {', '.join(RESULT_COLUMNS)}; this model's "
                         f"task is {task!r}: load it with --task set to one of them")
    return [prefix + name for name in RESULT_COLUMNS[task]]


def arrow_types(task: str, prefix: str = "") -> dict[str, Any]:
    """Column types that inference from values would get wrong or make larger than needed."""
    import pyarrow as pa

    if task == "feature-extraction":
        return {prefix + "embedding": pa.list_(pa.float32())}
    if task == "sequence-classification":
        return {prefix + "label": pa.string(), prefix + "score": pa.float64(),
                prefix + "scores": pa.map_(pa.string(), pa.float64())}
    return {}


def run_block(model: Any, texts: Sequence[Any], contexts: Sequence[Any] | None, options: Options,
              prefix: str = "", progress: bool | None = False) -> Outcome:
    task = model.task
    names = result_columns(task, prefix)
    common = {"batch_size": options.batch_size, "truncation": options.truncation,
              "progress": progress}
    if task == "feature-extraction":
        index, vectors, errors = encode_rows(model, texts, max_batch_tokens=options.max_batch_tokens,
                                             normalize=options.normalize, **common)
        values = [vectors.tolist()]
    elif task == "causal-lm":
        index, generated, errors = generate_rows(model, texts, max_new_tokens=options.max_new_tokens,
                                                 **common, **options.generate_kwargs)
        values = [generated]
    else:
        inputs = list(zip(texts, contexts, strict=True)) if task == "question-answering" else texts
        index, results, errors = predict_rows(model, inputs, max_batch_tokens=options.max_batch_tokens,
                                              **common)
        if task == "sequence-classification":
            values = [[r["label"] for r in results], [r["score"] for r in results],
                      [r["scores"] for r in results]]
        elif task == "token-classification":
            values = [results]
        else:
            values = [[r[k] for r in results] for k in ("answer", "score", "start", "end")]
    # results come in encoded order; write them in the block's order
    order = sorted(range(len(index)), key=index.__getitem__)
    columns = {name: [column[i] for i in order] for name, column in zip(names, values, strict=True)}
    return Outcome([index[i] for i in order], columns, errors)
