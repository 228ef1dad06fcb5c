"""Model outputs -> answers in the user's terms: labels, entities with character spans, answers.

The same post-processing as transformers' pipelines (simple/first-token aggregation for entities,
best start <= end span inside the context for question answering), done per batch on tensors.
"""

from __future__ import annotations

from typing import Any

import torch

# Longest answer, in tokens, the span search considers (transformers' pipeline default too).
MAX_ANSWER_TOKENS = 30


def label_names(config: Any, n: int) -> list[str]:
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(n)]


def classification(logits: torch.Tensor, config: Any) -> list[dict[str, Any]]:
    """Per row: the top label, its probability, and every label's probability."""
    probs = logits.float().softmax(-1).cpu()
    names = label_names(config, probs.shape[-1])
    out = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"label": names[best], "score": row[best],
                    "scores": dict(zip(names, row, strict=True))})
    return out


def _split_tag(label: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', 'O'); a label with no IOB prefix is its own type."""
    if len(label) > 2 and label[1] == "-" and label[0] in "BIES":
        return label[0], label[2:]
    return ("O", "O") if label == "O" else ("I", label)


def entities(logits: torch.Tensor, text: str, offsets: list[tuple[int, int]],
             word_ids: list[int | None], config: Any) -> list[dict[str, Any]]:
    """One row's token logits -> entities aggregated to whole words (a word takes its first
    token's label and score), consecutive words of one type merged, character spans in ``text``.
    A 'B-' tag starts a new entity even right after one of the same type."""
    probs = logits.float().softmax(-1).cpu()
    names = label_names(config, probs.shape[-1])
    words: list[tuple[str, str, float, int, int]] = []  # (tag, type, score, start, end)
    last_word = None
    for t, word in enumerate(word_ids[: probs.shape[0]]):
        if word is None:
            continue
        start, end = offsets[t]
        if word == last_word:  # later tokens of a word only extend its span
            tag, kind, score, w_start, _ = words[-1]
            words[-1] = (tag, kind, score, w_start, end)
            continue
        last_word = word
        best = int(probs[t].argmax())
        tag, kind = _split_tag(names[best])
        words.append((tag, kind, float(probs[t, best]), start, end))
    found: list[dict[str, Any]] = []
    group: list[tuple[str, str, float, int, int]] = []

    def close() -> None:
        if group:
            start, end = group[0][3], group[-1][4]
            found.append({"entity_group": group[0][1],
                          "score": sum(w[2] for w in group) / len(group),
                          "word": text[start:end], "start": start, "end": end})
            group.clear()

    for w in words:
        tag, kind = w[0], w[1]
        if kind == "O":
            close()
            continue
        if group and (kind != group[-1][1] or tag in ("B", "S")):
            close()
        group.append(w)
        if tag in ("E", "S"):
            close()
    close()
    return found


def answers(start_logits: torch.Tensor, end_logits: torch.Tensor, contexts: list[str],
            offsets: list[list[tuple[int, int]]], sequence_ids: list[list[int | None]]
            ) -> list[dict[str, Any]]:
    """Per row: the context span with the highest start x end probability (start <= end, at most
    MAX_ANSWER_TOKENS long), as text and character offsets in the context."""
    out = []
    for r, context in enumerate(contexts):
        n = len(sequence_ids[r])
        in_context = torch.tensor([s == 1 for s in sequence_ids[r]])
        start = start_logits[r, :n].float().cpu().masked_fill(~in_context, float("-inf")).softmax(-1)
        end = end_logits[r, :n].float().cpu().masked_fill(~in_context, float("-inf")).softmax(-1)
        scores = start[:, None] * end[None, :]
        allowed = torch.ones(n, n, dtype=torch.bool).triu().tril(MAX_ANSWER_TOKENS - 1)
        scores = scores.masked_fill(~allowed, 0.0)
        flat = int(scores.argmax())
        s, e = divmod(flat, n)
        char_start, char_end = offsets[r][s][0], offsets[r][e][1]
        out.append({"answer": context[char_start:char_end], "score": float(scores[s, e]),
                    "start": char_start, "end": char_end})
    return out
