"""`FastGenerator`: HF-compatible `generate` over a static KV cache and a compiled decode step."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from torchbridge.backends import synchronize
from torchbridge.generation.compiling import compiled_prompt_layer, inductor_options, own_method
from torchbridge.generation.decoders import DECODERS, CausalDecoder, StaticKVCache
from torchbridge.generation.native_step import NATIVE_PROMPT_TOKENS, NativeStep
from torchbridge.generation.sampling import (
    MIN_LENGTH_RULES,
    SUPPORTED_ARGS,
    build_processors,
    eos_banned_below,
    resolve_settings,
    select_next,
)

__all__ = ["FastGenerator", "cache_length_bucket"]

# Caches kept alive between calls: reusing one keeps its tensors' addresses (CUDA graphs) and
# avoids reallocating; a handful bounds the memory when many shapes are used.
_MAX_CACHES = 4
_RECOMPILE_LIMIT = 64
# On accelerators, check "all rows finished" only every few tokens so that the loop does not
# wait on the device each token; the output is trimmed to the exact stop afterwards.
_SYNC_EVERY_ACCEL = 16


def cache_length_bucket(needed: int) -> int:
    """Cache lengths are powers of two (>= 64): one compilation per length bucket, and attention
    over the padded cache costs at most 2x the request's own length."""
    length = 64
    while length < needed:
        length *= 2
    return length


class FastGenerator:
    """Greedy / sampled generation for GPT-2 and Llama-family HF causal LMs.

    The model is used as it is (device, dtype, int8 weights from
    `torchbridge.precisions.int8_weight_only.quantize_weights_int8`); it is not modified. `compile=False` runs
    the same functional decoder eagerly (used as the reference for the compiled path). With
    `compile=True` on a CPU the prompt's layers are compiled too unless `compile_prompt=False`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        compile: bool = True,
        compile_mode: str | None = "reduce-overhead",
        compile_prompt: bool | None = None,
        native_step: bool | None = None,
    ) -> None:
        if not self.supports(model):
            raise ValueError(
                f"FastGenerator supports causal LMs of model_type {sorted(DECODERS)}; got "
                f"{getattr(getattr(model, 'config', None), 'model_type', type(model).__name__)!r}"
            )
        self.model = model
        self.device = next(model.parameters()).device
        if compile_prompt and (not compile or self.device.type != "cpu"):
            raise ValueError(
                f"compile_prompt=True needs compile=True on a CPU (got compile={compile} on "
                f"{self.device.type}): the prompt's layers are compiled on CPUs only; leave "
                f"compile_prompt unset for the default")
        self.decoder: CausalDecoder = DECODERS[model.config.model_type](model).eval()
        self._native, decode_step = self._native_step(native_step, compile)
        self.compile = compile
        self.compile_mode = compile_mode
        self._caches: OrderedDict[tuple[int, int], StaticKVCache] = OrderedDict()
        self._reserved: StaticKVCache | None = None
        self._seen_keys: set[tuple[int, int, bool]] = set()
        self._step = lambda first, *args: self.decoder.decode_next(*args)
        self._prompt_layer: Any = None  # None: the decoder's own, eager
        self.stats: dict[str, Any] = {
            "compiles": 0,  # of the decode step
            "prompt_compiles": 0,  # of the prompt's layers (CPU)
            "compile_s": 0.0,
            "compiled": compile,
            "compile_mode": compile_mode,
            "weight_bytes_per_token": self.decoder.weight_bytes_per_token(),
            "decode_step": decode_step,  # which step one sequence's tokens take, and why
        }
        if compile:
            import torch._inductor.inductor_prims  # noqa: F401  (used by projections._realize)

            options = inductor_options(compile_mode, self.device)

            def counting(stat: str) -> Any:
                def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
                    # Counting here counts real graph compilations (recompiles included).
                    from torch._inductor.compile_fx import compile_fx

                    self.stats[stat] += 1
                    return compile_fx(gm, example_inputs, config_patches=options)

                return backend

            # No guards on the decoder's own modules and buffers: it is private to this
            # generator and never changes after construction, and checking ~150 tensors'
            # properties before every step cost 0.4 ms of GPT-2's ~16.5 ms/token on the
            # development CPU (16.36 vs 16.74 ms, interleaved, ad hoc). The arguments (cache,
            # positions, tokens) keep their guards, which is what picks a graph per cache.
            compiled = torch.compile(
                own_method(CausalDecoder.decode_next, self.decoder), backend=counting("compiles"),
                fullgraph=True, dynamic=False,
                options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe},
            )
            if compile_prompt is not False and self.device.type == "cpu":
                self._prompt_layer = compiled_prompt_layer(self.decoder,
                                                            counting("prompt_compiles"))

            def step(first: bool, *args: Any) -> Any:
                gemv = args[6]  # one sequence
                if self._native is not None and gemv:
                    return self._native(*args)
                if not first:
                    return compiled(*args)
                # One graph per (batch, cache length): more than dynamo's default 8 shapes per
                # generator is legitimate (many batch sizes), so the limit is raised for the call
                # that compiles (only then: the patch costs ~0.1 ms, ~2% of a GPT-2 step).
                with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                    return compiled(*args)

            self._step = step

    def _native_step(self, asked: bool | None, compile: bool) -> tuple[NativeStep | None, str]:
        """The C++ decode step for one sequence (generation/native_step.py) and what the stats
        say of it: used where it can run when compiling on a CPU (``native_step=None``), never
        with False; True raises where it cannot run."""
        if not compile:
            why = "compile=False: the eager decoder is the reference"
        elif self.device.type != "cpu":
            why = f"it runs on CPUs, the model is on {self.device.type}"
        else:
            why = NativeStep.unavailable(self.decoder)
        if asked and why:
            raise ValueError(f"native_step=True, but the native decode step cannot run here: "
                             f"{why}; leave native_step unset to use the compiled step")
        if not compile:
            return None, "eager"
        if asked is False:
            return None, "compiled (native step off)"
        if why:
            return None, f"compiled (native step unavailable: {why})"
        return NativeStep(self.decoder), "native (kernels/decode_step.cpp)"

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        cfg = getattr(model, "config", None)
        return (
            cfg is not None
            and getattr(cfg, "model_type", None) in DECODERS
            and not getattr(cfg, "is_encoder_decoder", False)
            and hasattr(model, "lm_head")
        )

    # -- public API ------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_length: int | None = None,
        max_new_tokens: int | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor:
        """HF `generate` semantics: returns prompt + new tokens [B * num_return_sequences, T + n];
        rows that finished early are padded with pad_token_id; defaults from the model's
        generation_config. Arguments outside `SUPPORTED_ARGS` raise ValueError."""
        unknown = sorted(set(kwargs) - set(SUPPORTED_ARGS))
        if unknown:
            raise ValueError(
                f"FastGenerator.generate does not support {unknown}; supported: input_ids, "
                f"attention_mask, {', '.join(SUPPORTED_ARGS)}"
            )
        if kwargs.pop("use_cache", True) is False:
            raise ValueError("use_cache=False is not supported: this path is built on the KV cache")
        generator = kwargs.pop("generator", None)
        streamer = kwargs.pop("streamer", None)
        bos = kwargs.pop("bos_token_id", None)
        if input_ids is None:
            bos = bos if bos is not None else self.model.generation_config.bos_token_id
            if bos is None:
                raise ValueError("input_ids is None and no bos_token_id is defined")
            input_ids = torch.full((1, 1), int(bos), dtype=torch.long, device=self.device)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.device)
        b0, t = input_ids.shape
        s = resolve_settings(
            self.model.generation_config,
            {"max_length": max_length, "max_new_tokens": max_new_tokens, **kwargs},
            t,
            getattr(self.model.config, "max_position_embeddings", None),
        )
        if attention_mask is None:
            attention_mask = self._default_mask(input_ids, s.pad_token_id, s.eos_token_ids)
        attention_mask = attention_mask.to(self.device)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("right padding is not supported: pad prompts on the left "
                             "(tokenizer.padding_side = 'left')")
        if s.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(s.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(s.num_return_sequences, dim=0)
        b = input_ids.shape[0]
        n_new = s.max_new_tokens
        limit = self.decoder.max_positions
        if limit is not None and int(attention_mask.sum(-1).max()) + n_new - 1 > limit:
            raise ValueError(f"prompt + {n_new} new tokens exceed the model's {limit} positions")

        cache = self._cache(b, t + n_new - 1)
        gemv = self.compile and b == 1
        key = (b, cache.length, gemv)
        procs = build_processors(s, t, attention_mask, self.device)
        eos = (torch.tensor(s.eos_token_ids, device=self.device)
               if s.eos_token_ids is not None else None)
        sync_every = 1 if (streamer is not None or self.device.type == "cpu") else _SYNC_EVERY_ACCEL

        out = torch.empty(b, t + n_new, dtype=torch.long, device=self.device)
        out[:, :t] = input_ids
        if streamer is not None:
            streamer.put(input_ids.cpu())
        unfinished = torch.ones(b, dtype=torch.bool, device=self.device)
        all_done = torch.zeros(n_new, dtype=torch.bool, device=self.device)
        cache_pos = torch.tensor([t], dtype=torch.long, device=self.device)

        # Greedy decoding takes the step's own argmax (compiled with it), with EOS banned there
        # while HF's min-length rules would ban it; anything else processes the logits.
        greedy_in_step = not s.do_sample and all(isinstance(p, MIN_LENGTH_RULES) for p in procs)
        ban_below = eos_banned_below(procs)
        t0 = time.perf_counter()
        logits, positions = self._prefill(cache, input_ids, attention_mask)
        no_ban, ban_eos = self._bans(logits.shape[-1], s.eos_token_ids)
        greedy = None
        cur, decode_s, ttft, steps = t, 0.0, 0.0, 0
        for i in range(n_new):
            if greedy_in_step and greedy is not None:
                nxt = greedy
            else:
                scores = procs(out[:, :cur], logits) if len(procs) else logits
                nxt = select_next(scores, s.do_sample, generator)
            if eos is not None:
                nxt = torch.where(unfinished, nxt, s.pad_token_id)
            out[:, cur] = nxt
            cur += 1
            if i == 0:
                synchronize(self.device)
                ttft = time.perf_counter() - t0
            if streamer is not None:
                streamer.put(nxt.cpu())
            if eos is not None:
                unfinished &= ~torch.isin(nxt, eos)
                all_done[i] = ~unfinished.any()
                if (i + 1) % sync_every == 0 and bool(all_done[i]):
                    break
            if i == n_new - 1:
                break
            first = key not in self._seen_keys
            ts = time.perf_counter()
            if self.compile and self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            logits, greedy, positions, cache_pos = self._step(
                first, nxt, positions, cache_pos, cache.k, cache.v, cache.valid, gemv,
                ban_eos if cur < ban_below else no_ban)
            if first:  # the first call of a new shape compiles: count it apart from decoding
                synchronize(self.device)
                self._seen_keys.add(key)
                self.stats["compile_s"] += time.perf_counter() - ts
                t0 += time.perf_counter() - ts
            else:
                decode_s += time.perf_counter() - ts
                steps += 1
        if eos is not None and sync_every > 1 and bool(all_done[: cur - t].any()):
            cur = t + int(all_done[: cur - t].nonzero()[0, 0]) + 1  # exact HF stop point
        synchronize(self.device)
        total = time.perf_counter() - t0
        if streamer is not None:
            streamer.end()
        self.stats.update(
            time_to_first_token_ms=ttft * 1e3,
            decode_ms_per_token=(decode_s / steps * 1e3) if steps else None,
            new_tokens=cur - t,
            total_ms=total * 1e3,
            batch=b,
            cache_length=cache.length,
            gemv_decode=gemv,
        )
        return out[:, :cur]

    @torch.inference_mode()
    def forced_argmax(
        self, input_ids: torch.Tensor, forced: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher forcing through the same prefill + decode step as `generate`: feed `forced`
        [B, n] after the prompt and return the argmax predicted before each forced token
        [B, n]. Used to measure next-token agreement without one early near-tie deciding all
        later positions of a free-running comparison."""
        input_ids, forced = input_ids.to(self.device), forced.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        b, t = input_ids.shape
        n = forced.shape[1]
        cache = self._cache(b, t + n - 1)
        gemv = self.compile and b == 1
        logits, positions = self._prefill(cache, input_ids, attention_mask)
        no_ban, _ = self._bans(logits.shape[-1], None)
        preds = [logits.argmax(-1)]
        cache_pos = torch.tensor([t], dtype=torch.long, device=self.device)
        key = (b, cache.length, gemv)
        for i in range(n - 1):
            if self.compile and self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            _, greedy, positions, cache_pos = self._step(
                key not in self._seen_keys, forced[:, i].contiguous(), positions, cache_pos,
                cache.k, cache.v, cache.valid, gemv, no_ban)
            self._seen_keys.add(key)
            preds.append(greedy)
        return torch.stack(preds, 1)

    # -- helpers ---------------------------------------------------------------------------------

    def _prefill(self, cache: StaticKVCache, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._native is not None and input_ids.shape[0] == 1 \
                and input_ids.shape[1] <= NATIVE_PROMPT_TOKENS:
            return self._native.prefill(cache, input_ids, attention_mask)
        if self._prompt_layer is None:
            return self.decoder.prefill(cache, input_ids, attention_mask)
        # a graph per batch-size class, cache length and layer format: more than dynamo's
        # default 8 is legitimate (the patch costs ~0.1 ms, once per prompt)
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            return self.decoder.prefill(cache, input_ids, attention_mask, self._prompt_layer)

    @staticmethod
    def _default_mask(
        input_ids: torch.Tensor, pad: int | None, eos: list[int] | None
    ) -> torch.Tensor:
        # HF's rule: infer padding from pad_token_id only when pad is present and is not eos.
        if pad is not None and bool((input_ids == pad).any()) and (eos is None or pad not in eos):
            return input_ids.ne(pad).long()
        return torch.ones_like(input_ids)

    def _bans(self, vocab: int, eos: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step's ``banned`` masks [V]: nothing, and the EOS tokens."""
        no_ban = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        ban_eos = no_ban.clone()
        ids = [e for e in eos or () if 0 <= e < vocab]  # HF's rule bans what the vocab has
        if ids:
            ban_eos[torch.tensor(ids, device=self.device)] = True
        return no_ban, ban_eos

    def reserve(self, batch: int, length: int) -> None:
        """Allocate the KV cache for ``batch`` sequences of ``length`` tokens now; the next call
        of that batch size that fits in it runs on it, so a warm-up of a few tokens compiles the
        decode step for the cache real requests of that size will use."""
        self._reserved = self._cache(batch, length)

    def _cache(self, batch: int, needed: int) -> StaticKVCache:
        reserved, self._reserved = self._reserved, None
        if reserved is not None and reserved.batch == batch and reserved.length >= needed:
            return reserved
        # Each request runs on the cache of its own length bucket, compiled once per (batch,
        # bucket), rather than on a longer one already compiled: every decode step attends over
        # the whole cache, and GPT-2 int8-weight-only decoding 57 tokens on a 128-slot cache ran
        # 8% slower a token than on the 64-slot one (5.92 vs 5.46 ms, interleaved, ad hoc).
        key = (batch, cache_length_bucket(needed))
        if key in self._caches:
            self._caches.move_to_end(key)
            return self._caches[key]
        cache = self.decoder.new_cache(batch, key[1], self.device)
        self._caches[key] = cache
        if len(self._caches) > _MAX_CACHES:
            self._caches.popitem(last=False)
        return cache
