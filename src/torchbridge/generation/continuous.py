"""Continuous batching: a fixed set of slots in one static KV cache, requests join and leave
between decode steps.

`FastGenerator.generate` decodes one batch from start to end: a request arriving a token later
waits for the whole batch. Here every slot of the cache is an independent sequence with its own
cache position and model position, so a new request is prefilled into a free slot and decodes
with the others from the next step on, and a finished (or abandoned) request frees its slot at
once. The arithmetic is the decoder's own (`embed` / `layer` / `head` of
`torchbridge.generation.decoders`); only the cache bookkeeping differs from `decode_step`:
one write position per row instead of one shared by the batch.

Two views keep a step's cost close to the work that is live:
- rows: slots are handed out lowest index first and a step runs over the first `rows` slots,
  `rows` the smallest power of two covering the highest busy slot; the view of the cache is a
  slice, no copy.
- length: attention reads the cache up to a power-of-two bucket of the longest live sequence,
  not the whole preallocated length.

Each request carries its own HF-resolved settings and logits processors (temperature, top-p,
top-k, repetition penalty, min tokens) and its own `torch.Generator`, so a row's tokens are
those `generate` would give the same request alone: greedy output is identical token for token
(tested), sampled output draws from the same distributions.

Not thread-safe: one thread (the serving engine's) owns a batcher; other threads may only call
`GenerationRequest.cancel`, which takes effect at the next step boundary.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchbridge.generation.decoders import CausalDecoder
from torchbridge.generation.generator import FastGenerator, cache_length_bucket
from torchbridge.generation.sampling import build_processors, resolve_settings, select_next

__all__ = ["GenerationRequest", "TokenEvent", "ContinuousBatcher"]


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to continue. Sampling arguments follow HF `generate` (`do_sample`,
    `temperature`, `top_p`, `top_k`, `repetition_penalty`, ...); `seed` seeds this request's
    own generator (None: a random seed)."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    # filled in by the batcher
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos), "length", "cancelled" or the caller's word
    slot: int | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Ask the batcher to drop this request at the next step boundary (any thread)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TokenEvent:
    request: GenerationRequest
    token: int | None  # None when the request left without a new token (cancelled)
    finish_reason: str | None


@dataclass
class _Row:
    request: GenerationRequest
    out: torch.Tensor  # [1, prompt + max_new] token buffer, what the processors look back on
    length: int  # tokens in `out` so far
    processors: Any
    do_sample: bool
    eos: set[int]
    generator: torch.Generator | None


def _decoder_of(model: nn.Module) -> tuple[CausalDecoder, torch.device]:
    """The functional decoder behind an optimized model's generate (its weights are shared), or
    a new one for a plain HF causal LM."""
    fast = getattr(getattr(model, "generate", None), "torchbridge_generator", None)
    if fast is None:
        fast = FastGenerator(model, compile=False)
    return fast.decoder, fast.device


class ContinuousBatcher:
    """`slots` concurrent sequences of up to `max_length` tokens (prompt + new) each.

    Use: `add(request)` while `free_slots` (prefills it and yields its first token), then
    `step()` repeatedly (one token for every active request); both return `TokenEvent`s, a
    request's last event carries its `finish_reason`.
    """

    def __init__(self, model: nn.Module, *, slots: int = 8, max_length: int = 1024) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model = model
        self.decoder, self.device = _decoder_of(model)
        limit = self.decoder.max_positions
        if limit is not None and max_length > limit:
            max_length = limit  # a longer cache could never be filled: positions run out first
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.slots = slots
        self.max_length = max_length
        self.cache = self.decoder.new_cache(slots, max_length, self.device)
        # every slot holds one unpadded sequence: all keys valid, causality comes from cache_pos
        self.cache.valid.fill_(True)
        self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.cache_pos = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.rows: list[_Row | None] = [None] * slots
        self.steps = 0
        self.last_step_rows = 0

    # -- state ---------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def free_slots(self) -> int:
        return self.slots - self.active

    def check(self, prompt_length: int, max_new_tokens: int) -> None:
        """Raise ValueError when a request of this size cannot fit a slot."""
        if prompt_length < 1:
            raise ValueError("the prompt is empty: at least one token is needed")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompt_length + max_new_tokens - 1 > self.max_length:
            raise ValueError(
                f"prompt of {prompt_length} tokens + {max_new_tokens} new tokens exceeds the "
                f"{self.max_length} tokens of a slot; fix: a shorter prompt or fewer new tokens")

    # -- joining and leaving -------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, request: GenerationRequest) -> list[TokenEvent]:
        """Prefill `request` into the lowest free slot; returns its first token's event."""
        if self.free_slots == 0:
            raise RuntimeError("no free slot: call add() only while free_slots > 0")
        t = len(request.prompt_ids)
        self.check(t, request.max_new_tokens)
        settings = resolve_settings(
            self.model.generation_config,
            {"max_new_tokens": request.max_new_tokens, **request.generate_kwargs}, t,
            self.decoder.max_positions)
        slot = self.rows.index(None)
        ids = torch.as_tensor(list(request.prompt_ids), dtype=torch.long,
                              device=self.device)[None]
        out = torch.empty(1, t + settings.max_new_tokens, dtype=torch.long, device=self.device)
        out[:, :t] = ids
        generator = None
        if settings.do_sample:
            generator = torch.Generator(self.device)
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(request.seed))
        row = _Row(request, out, t,
                   build_processors(settings, t, torch.ones_like(ids), self.device),
                   settings.do_sample, set(settings.eos_token_ids or ()), generator)
        request.max_new_tokens = settings.max_new_tokens
        request.slot = slot
        self.rows[slot] = row
        logits = self._prefill(slot, ids)
        self.positions[slot] = t
        self.cache_pos[slot] = t
        return [self._accept(slot, logits)]

    def _release(self, slot: int) -> None:
        self.rows[slot] = None
        # a free row still runs inside the step's view: keep its writes at position 0, in range
        self.tokens[slot] = 0
        self.positions[slot] = 0
        self.cache_pos[slot] = 0

    def drop_cancelled(self) -> list[TokenEvent]:
        """Free the slots of cancelled requests (a disconnected client's, say)."""
        events = []
        for slot, row in enumerate(self.rows):
            if row is not None and row.request.cancelled:
                row.request.finish_reason = row.request.finish_reason or "cancelled"
                events.append(TokenEvent(row.request, None, row.request.finish_reason))
                self._release(slot)
        return events

    def finish(self, request: GenerationRequest, reason: str) -> None:
        """End `request` now (e.g. a stop string matched): its slot is free for the next add."""
        if request.slot is not None and self.rows[request.slot] is not None \
                and self.rows[request.slot].request is request:
            request.finish_reason = reason
            self._release(request.slot)

    # -- decoding ------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One new token for every active request."""
        events = self.drop_cancelled()
        busy = [s for s, r in enumerate(self.rows) if r is not None]
        if not busy:
            return events
        rows = min(self.slots, _pow2_at_least(busy[-1] + 1))
        longest = int(self.cache_pos[busy].max()) + 1
        length = min(self.max_length, cache_length_bucket(longest))
        logits = self._decode(rows, length)
        self.positions[:rows] += 1
        self.cache_pos[:rows] += 1
        for slot in busy:
            events.append(self._accept(slot, logits[slot:slot + 1]))
        self.steps += 1
        self.last_step_rows = len(busy)
        return events

    def _accept(self, slot: int, logits: torch.Tensor) -> TokenEvent:
        row = self.rows[slot]
        assert row is not None
        scores = row.processors(row.out[:, :row.length], logits) if len(row.processors) else logits
        token = int(select_next(scores, row.do_sample, row.generator)[0])
        row.out[0, row.length] = token
        row.length += 1
        req = row.request
        req.tokens.append(token)
        self.tokens[slot] = token
        reason = None
        if token in row.eos:
            reason = "stop"
        elif len(req.tokens) >= req.max_new_tokens:
            reason = "length"
        if reason is not None:
            req.finish_reason = reason
            self._release(slot)
        return TokenEvent(req, token, reason)

    def _prefill(self, slot: int, ids: torch.Tensor) -> torch.Tensor:
        """The prompt [1, T] into `slot`'s rows of the cache; logits [1, V] of its last token.
        Same masks as `CausalDecoder.prefill` for an unpadded prompt."""
        d, t = self.decoder, ids.shape[1]
        length = min(self.max_length, cache_length_bucket(t))
        ks = [k[slot:slot + 1, :, :length] for k in self.cache.k]
        vs = [v[slot:slot + 1, :, :length] for v in self.cache.v]
        positions = torch.arange(t, device=self.device)[None]
        idx = torch.arange(length, device=self.device)
        allowed = (idx[None, :] <= torch.arange(t, device=self.device)[:, None])[None]

        def write_kv(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            ks[i][:, :, :t] = k
            vs[i][:, :, :t] = v

        def read_kv(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return ks[i], vs[i]

        h = d.embed(ids, positions)
        for i in range(d.n_layers):
            h = d.layer(i, h, positions, write_kv, read_kv, allowed, gemv=False)
        return d.head(h[:, -1:], gemv=False)[:, 0]

    def _decode(self, rows: int, length: int) -> torch.Tensor:
        """One token for slots [0, rows), each at its own cache position; logits [rows, V]."""
        d = self.decoder
        tokens, positions = self.tokens[:rows], self.positions[:rows]
        cache_pos = self.cache_pos[:rows]
        ks = [k[:rows, :, :length] for k in self.cache.k]
        vs = [v[:rows, :, :length] for v in self.cache.v]
        idx = torch.arange(length, device=self.device)
        allowed = (idx[None, :] <= cache_pos[:, None])[:, None, :]  # [rows, 1, L]
        row_idx = torch.arange(rows, device=self.device)

        def write_kv(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            # k [rows, H, 1, D] -> cache[r, :, cache_pos[r]] for each row r
            ks[i][row_idx, :, cache_pos] = k[:, :, 0]
            vs[i][row_idx, :, cache_pos] = v[:, :, 0]

        def read_kv(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return ks[i], vs[i]

        pos = positions[:, None]
        h = d.embed(tokens[:, None], pos)
        for i in range(d.n_layers):
            h = d.layer(i, h, pos, write_kv, read_kv, allowed, gemv=False)
        return d.head(h, gemv=False)[:, 0]


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p
