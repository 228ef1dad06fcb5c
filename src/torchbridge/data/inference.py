"""Batched inference over lists of texts: ``encode``, ``predict``, ``generate_text``.

Each call tokenizes inside, forms batches by a token budget over length-sorted inputs (see
:mod:`torchbridge.data.texts`), runs the optimized model under ``no_grad`` and returns results in
the caller's order. Bad input raises ``ValueError`` naming the row; the ``*_rows`` variants used
by the file runner and Ray instead return the bad rows' reasons and keep going.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from torchbridge.data import heads
from torchbridge.data.pooling import pool, pooling_for
from torchbridge.data.texts import Encoded, InputError, collate, max_tokens, plan_batches, tokenize
from torchbridge.pipeline.checks import max_positions

OUTPUTS = ("numpy", "torch", "list")
PREDICT_TASKS = ("sequence-classification", "token-classification", "question-answering")
# Rows above which a progress bar shows by default (when stderr is a terminal).
PROGRESS_MIN_ROWS = 1000
# Generation batches rows, not tokens: each row decodes max_new_tokens steps whatever its length.
DEFAULT_GENERATE_BATCH = 8


def _tokenizer(model: Any) -> Any:
    return model.tokenizer  # the wrapper loads it lazily and says how to set one if it cannot


def _pad_id(tokenizer: Any, model: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id,
                      getattr(model.config, "pad_token_id", None),
                      getattr(model.config, "eos_token_id", None)):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def _progress(total: int, progress: bool | None, desc: str):
    show = progress if progress is not None else (
        total >= PROGRESS_MIN_ROWS and sys.stderr.isatty()
        and not os.environ.get("TORCHBRIDGE_NO_PROGRESS"))
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="text")


def _batches(model: Any, enc: Encoded, *, batch_size: int | None, max_batch_tokens: int | None,
             progress: bool | None, desc: str, side: str = "right",
             keys: Sequence[str] = ("input_ids", "token_type_ids")
             ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(rows of ``enc``, padded tensors on the model's device) per batch, longest first. The
    tensors may hold more rows than ``rows``: filler after them, whose outputs the caller drops
    (right padding keeps the set of batch shapes bounded, see texts.py)."""
    lengths = [enc.length(r) for r in range(len(enc.index))]
    bar = _progress(len(lengths), progress, desc)
    pad = _pad_id(_tokenizer(model), model)
    positions = max_positions(model.config) if side == "right" else None
    try:
        for batch in plan_batches(lengths, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                  max_width=positions):
            rows = batch[:len(set(batch))]  # filler repeats the last row
            yield rows, collate([enc.features[r] for r in batch], pad, side=side, keys=keys,
                                device=model.device, max_width=positions)
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()


def _raise_first(errors: dict[int, str]) -> None:
    if errors:
        i = min(errors)
        extra = f" ({len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
        raise InputError(i, errors[i] + extra)


# --- embeddings -----------------------------------------------------------------------------


def encode_rows(model: Any, texts: Sequence[Any], *, batch_size: int | None = None,
                max_batch_tokens: int | None = None, normalize: bool = False,
                truncation: bool = True, progress: bool | None = None
                ) -> tuple[list[int], torch.Tensor, dict[int, str]]:
    """(input indices of the valid rows, their fp32 embeddings [n_valid, dim] in that order,
    reasons of the bad rows by index)."""
    pooling = pooling_for(model)
    tokenizer = _tokenizer(model)
    enc = tokenize(tokenizer, texts, max_tokens(model, tokenizer), truncation=truncation)
    hidden_size = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", 0)
    vectors = torch.empty(len(enc.index), hidden_size, dtype=torch.float32)
    feature_extraction = model.task == "feature-extraction"
    with torch.no_grad():
        for rows, batch in _batches(model, enc, batch_size=batch_size,
                                    max_batch_tokens=max_batch_tokens, progress=progress,
                                    desc="encode"):
            if feature_extraction:
                hidden = model(**batch).last_hidden_state
            else:  # a model with a head: the encoder's last layer, before the head
                hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
            n = len(rows)
            pooled = pool(hidden[:n], batch["attention_mask"][:n], pooling.mode)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
            if pooled.shape[-1] != vectors.shape[-1]:
                vectors = torch.empty(len(enc.index), pooled.shape[-1], dtype=torch.float32)
            vectors[torch.tensor(rows)] = pooled.cpu()
    return enc.index, vectors, enc.errors


def encode(model: Any, texts: Sequence[str], *, batch_size: int | None = None,
           max_batch_tokens: int | None = None, normalize: bool = False, output: str = "numpy",
           progress: bool | None = None, truncation: bool = True) -> Any:
    """Sentence embeddings [len(texts), dim] in input order, pooled as the model's
    sentence-transformers config says (``model.pooling`` tells which), fp32.

    ``output``: "numpy" (np.ndarray), "torch" (CPU tensor) or "list" (lists of floats).
    Over-long texts are truncated to the model's limit unless ``truncation=False``, which raises
    ValueError naming the row, its token count and the limit; so do empty or non-string rows.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output={output!r}: expected one of {', '.join(OUTPUTS)}")
    _, vectors, errors = encode_rows(model, texts, batch_size=batch_size,
                                     max_batch_tokens=max_batch_tokens, normalize=normalize,
                                     truncation=truncation, progress=progress)
    _raise_first(errors)
    if output == "torch":
        return vectors
    return vectors.numpy() if output == "numpy" else vectors.tolist()


# --- classification, tagging, question answering -------------------------------------------


def _split_pairs(pairs: Sequence[Any]) -> tuple[list[Any], list[Any], dict[int, str]]:
    questions, contexts, errors = [], [], {}
    if isinstance(pairs, (str, bytes)):
        raise TypeError("question answering takes a list of (question, context) pairs")
    for i, pair in enumerate(pairs):
        if isinstance(pair, dict) and {"question", "context"} <= pair.keys():
            pair = (pair["question"], pair["context"])
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            errors[i] = (f"expected a (question, context) pair, got {type(pair).__name__}"
                         + (f" of length {len(pair)}" if isinstance(pair, (tuple, list)) else ""))
            pair = ("?", "?")  # placeholder, the row is already recorded as bad
        questions.append(pair[0])
        contexts.append(pair[1])
    return questions, contexts, errors


def predict_rows(model: Any, texts: Sequence[Any], *, batch_size: int | None = None,
                 max_batch_tokens: int | None = None, truncation: bool = True,
                 progress: bool | None = None) -> tuple[list[int], list[Any], dict[int, str]]:
    """(input indices of the valid rows, their results in that order, bad rows' reasons)."""
    task = model.task
    if task not in PREDICT_TASKS:
        hint = "generate_text" if task == "causal-lm" else "encode"
        raise ValueError(f"predict() is for {', '.join(PREDICT_TASKS)}; this model's task is "
                         f"{task!r}: use {hint}() instead, or load the model with the task wanted")
    tokenizer = _tokenizer(model)
    limit = max_tokens(model, tokenizer)
    pair_errors: dict[int, str] = {}
    if task == "question-answering":
        questions, contexts, pair_errors = _split_pairs(texts)
        enc = tokenize(tokenizer, questions, limit, truncation=truncation, pairs=contexts,
                       offsets=True)
        source = contexts
    else:
        enc = tokenize(tokenizer, texts, limit, truncation=truncation,
                       offsets=task == "token-classification")
        source = texts
    for i, reason in pair_errors.items():  # a malformed pair outranks what its placeholder gave
        enc.errors[i] = reason
    keep = [r for r, i in enumerate(enc.index) if i not in pair_errors]
    if len(keep) != len(enc.index):
        enc = Encoded([enc.index[r] for r in keep], [enc.features[r] for r in keep],
                      enc.word_ids and [enc.word_ids[r] for r in keep],
                      enc.sequence_ids and [enc.sequence_ids[r] for r in keep], enc.errors)
    results: list[Any] = [None] * len(enc.index)
    with torch.no_grad():
        for rows, batch in _batches(model, enc, batch_size=batch_size,
                                    max_batch_tokens=max_batch_tokens, progress=progress,
                                    desc="predict"):
            out = model(**batch)
            if task == "sequence-classification":
                found = heads.classification(out.logits[:len(rows)], model.config)
            elif task == "token-classification":
                found = [heads.entities(out.logits[b], source[enc.index[r]],
                                        enc.features[r]["offset_mapping"], enc.word_ids[r],
                                        model.config) for b, r in enumerate(rows)]
            else:
                found = heads.answers(out.start_logits, out.end_logits,
                                      [source[enc.index[r]] for r in rows],
                                      [enc.features[r]["offset_mapping"] for r in rows],
                                      [enc.sequence_ids[r] for r in rows])
            for r, result in zip(rows, found, strict=True):
                results[r] = result
    return enc.index, results, enc.errors


def predict(model: Any, texts: Sequence[Any], *, batch_size: int | None = None,
            max_batch_tokens: int | None = None, progress: bool | None = None,
            truncation: bool = True) -> list:
    """One result per input, in input order (see the module docstring of torchbridge.data):

    - sequence-classification: ``{"label", "score", "scores": {label: probability}}``;
    - token-classification: ``[{"entity_group", "score", "word", "start", "end"}, ...]``, entities
      aggregated to whole words, ``start``/``end`` character offsets into the text;
    - question-answering: ``texts`` are (question, context) pairs (or dicts with those keys);
      ``{"answer", "score", "start", "end"}`` with offsets into the context. Contexts longer than
      the model's limit are truncated (no sliding window), or rejected with ``truncation=False``.
    """
    _, results, errors = predict_rows(model, texts, batch_size=batch_size,
                                      max_batch_tokens=max_batch_tokens, truncation=truncation,
                                      progress=progress)
    _raise_first(errors)
    return results


# --- generation -----------------------------------------------------------------------------


def generate_rows(model: Any, prompts: Sequence[Any], *, max_new_tokens: int = 50,
                  batch_size: int | None = None, truncation: bool = True,
                  progress: bool | None = None, **generate_kwargs: Any
                  ) -> tuple[list[int], list[str], dict[int, str]]:
    """(input indices of the valid prompts, their continuations in that order, bad rows)."""
    if model.task != "causal-lm":
        raise ValueError(f"generate_text() needs a causal LM; this model's task is {model.task!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    tokenizer = _tokenizer(model)
    limit = max_tokens(model, tokenizer)
    # truncation keeps the end of a long prompt: the text generation continues from
    enc = tokenize(tokenizer, prompts, limit, truncation=truncation, side="left",
                   reserve=max_new_tokens)
    pad = _pad_id(tokenizer, model)
    generate_kwargs.setdefault("pad_token_id", pad)
    texts: list[str] = [""] * len(enc.index)
    with torch.no_grad():
        for rows, batch in _batches(model, enc, batch_size=batch_size or DEFAULT_GENERATE_BATCH,
                                    max_batch_tokens=None, progress=progress, desc="generate",
                                    side="left", keys=("input_ids",)):
            out = model.model.generate(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"],
                                       max_new_tokens=max_new_tokens, **generate_kwargs)
            new = out[:, batch["input_ids"].shape[1]:].cpu()
            for r, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True),
                               strict=True):
                texts[r] = text
    return enc.index, texts, enc.errors


def generate_text(model: Any, prompts: Sequence[str], *, max_new_tokens: int = 50,
                  batch_size: int | None = None, truncation: bool = True,
                  progress: bool | None = None, **generate_kwargs: Any) -> list[str]:
    """The generated continuation of each prompt (without the prompt), in input order.

    Prompts are batched by length with left padding (``batch_size`` rows per batch, default 8);
    ``generate_kwargs`` go to the model's ``generate`` (``do_sample``, ``temperature``, ``top_p``,
    ``top_k``, ``generator``...). A prompt that leaves no room for ``max_new_tokens`` within the
    model's positions keeps its last tokens, or raises with ``truncation=False``.
    """
    _, texts, errors = generate_rows(model, prompts, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, truncation=truncation,
                                     progress=progress, **generate_kwargs)
    _raise_first(errors)
    return texts
