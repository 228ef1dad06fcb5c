"""The native batch-1 decode step (kernels/decode_step.cpp via generation/native_step.py) against
the functional decoder's own eager step, on tiny GPT-2 and Llama models in every weight format
it reads, with widths that are not multiples of the kernel's vectors."""

from __future__ import annotations

import pytest
import torch
import transformers

from torchbridge import kernels
from torchbridge.generation import FastGenerator
from torchbridge.generation.native_step import NativeStep
from torchbridge.precisions import precision
from torchbridge.precisions.int8_dynamic import Int8DynamicLinear, quantize_dynamic_int8

WHY = kernels.unavailable()
needs_kernel = pytest.mark.skipif(WHY is not None, reason=f"native decode step unavailable: {WHY}")
VOCAB = 301


def tiny(family: str, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if family == "gpt2":  # 72 wide (4.5 vectors of 16), 3 heads of 24
        cfg = transformers.GPT2Config(**{"n_layer": 2, "n_embd": 72, "n_head": 3,
                                         "vocab_size": VOCAB, "n_positions": 128, **overrides})
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(**{
        "num_hidden_layers": 2, "hidden_size": 96, "intermediate_size": 136,
        "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": VOCAB,
        "max_position_embeddings": 256, **overrides})
    return transformers.LlamaForCausalLM(cfg).eval()


def in_format(model: torch.nn.Module, fmt: str) -> torch.nn.Module:
    if fmt == "bf16":
        return model.to(torch.bfloat16)
    if fmt.startswith("int8"):
        with torch.no_grad():
            return precision(fmt).quantize(model, (), None)
    return model


@torch.inference_mode()
def run_both(model: torch.nn.Module, steps: int = 16, banned: torch.Tensor | None = None):
    """Greedy decoding from the same prompt by the eager step and the native one, each on its
    own cache: (largest logit difference over the largest logit, tokens equal, caches' largest
    difference)."""
    decoder = FastGenerator(model, compile=False).decoder
    native = NativeStep(decoder)
    prompt = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(1))
    banned = torch.zeros(VOCAB, dtype=torch.bool) if banned is None else banned
    caches, states = [], []
    for _ in range(2):
        cache = decoder.new_cache(1, 64, torch.device("cpu"))
        logits, positions = decoder.prefill(cache, prompt, torch.ones_like(prompt))
        caches.append(cache)
        states.append([logits.argmax(-1), positions, torch.tensor([7])])
    worst, same = 0.0, True
    for _ in range(steps):
        outs = []
        for step, cache, state in zip((decoder.decode_next, native), caches, states, strict=True):
            logits, greedy, state[1], state[2] = step(state[0], state[1], state[2], cache.k,
                                                      cache.v, cache.valid, True, banned)
            outs.append((logits, greedy))
        (want, want_greedy), (got, got_greedy) = outs
        worst = max(worst, float((want - got).abs().max() / want.abs().max()))
        same &= bool(torch.equal(want_greedy, got_greedy))
        states[0][0] = states[1][0] = want_greedy
    kv = max(float((a - b).abs().max()) for a, b in zip(caches[0].k + caches[0].v,
                                                          caches[1].k + caches[1].v, strict=True))
    return worst, same, kv


@needs_kernel
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8-weight-only", "int8-dynamic"])
def test_native_step_computes_the_decoders_step(family, fmt):
    worst, same, kv = run_both(in_format(tiny(family), fmt))
    assert worst < 1e-5 and same and kv < 1e-5


@needs_kernel
@pytest.mark.parametrize("fmt", ["fp32", "int8-dynamic"])
def test_odd_widths_heads_and_one_kv_head(fmt):
    """Widths, heads of 20 features and an MLP of 50 that fill no vector; all query heads on
    one kv head."""
    worst, same, kv = run_both(in_format(tiny("gpt2", n_embd=60, n_head=3, n_inner=50), fmt))
    assert worst < 1e-5 and same and kv < 1e-5
    llama = tiny("llama", hidden_size=80, num_attention_heads=5, num_key_value_heads=1,
                 intermediate_size=44)
    worst, same, kv = run_both(in_format(llama, fmt))
    assert worst < 1e-5 and same and kv < 1e-5


@needs_kernel
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_other_activations(act):
    worst, same, _ = run_both(tiny("gpt2", activation_function=act))
    assert worst < 1e-5 and same


@needs_kernel
def test_mixed_formats_and_smoothed_int8_dynamic_layers():
    """What the accuracy control leaves: some projections float among int8-dynamic ones, a
    smoothed int8-dynamic projection, a float head; and a bf16 model with int8 layers."""
    model = quantize_dynamic_int8(tiny("llama"), include_head=False,
                                  skip=["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"])
    linear = tiny("llama").model.layers[1].self_attn.q_proj
    smooth = torch.rand(linear.in_features, generator=torch.Generator().manual_seed(2)) + 0.5
    model.model.layers[1].self_attn.q_proj = Int8DynamicLinear(linear, smooth=smooth)
    worst, same, _ = run_both(model)
    assert worst < 1e-5 and same
    mixed = quantize_dynamic_int8(tiny("gpt2").to(torch.bfloat16), skip=["transformer.h.0.mlp.c_fc"])
    worst, same, _ = run_both(mixed)
    assert worst < 1e-5 and same


@needs_kernel
def test_banned_tokens_are_not_chosen_and_the_logits_stay():
    model = tiny("gpt2")
    decoder = FastGenerator(model, compile=False).decoder
    native = NativeStep(decoder)
    cache = decoder.new_cache(1, 64, torch.device("cpu"))
    with torch.inference_mode():
        prompt = torch.tensor([[5, 9, 40]])
        _, positions = decoder.prefill(cache, prompt, torch.ones_like(prompt))
        args = (torch.tensor([3]), positions, torch.tensor([3]), cache.k, cache.v, cache.valid, True)
        logits, greedy, _, _ = native(*args, torch.zeros(VOCAB, dtype=torch.bool))
        banned = torch.zeros(VOCAB, dtype=torch.bool)
        banned[greedy] = True
        again, second, _, _ = native(*args, banned)
    assert int(second) == int(logits[0].masked_fill(banned, float("-inf")).argmax())
    assert int(second) != int(greedy)
    torch.testing.assert_close(again, logits)


@needs_kernel
@torch.inference_mode()
def test_generator_takes_it_for_one_sequence_and_matches_the_eager_tokens():
    model = in_format(tiny("llama"), "int8-weight-only")
    fast, eager = FastGenerator(model), FastGenerator(model, compile=False)
    assert fast.stats["decode_step"].startswith("native")
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    got = fast.generate(prompt, max_new_tokens=100, min_new_tokens=100)  # a 128-slot cache
    assert torch.equal(got, eager.generate(prompt, max_new_tokens=100, min_new_tokens=100))
    assert fast.stats["compiles"] == 0 and fast.stats["cache_length"] == 128
    with pytest.raises(ValueError, match="positions below the model's 128"):
        gpt2 = FastGenerator(tiny("gpt2"))
        cache = gpt2._cache(1, 200)
        gpt2._native(torch.tensor([1]), torch.tensor([128]), torch.tensor([3]), cache.k, cache.v,
                     cache.valid, True, torch.zeros(VOCAB, dtype=torch.bool))


@needs_kernel
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("fmt", ["fp32", "int8-weight-only"])
def test_short_prompts_are_prefilled_by_the_kernel_as_the_decoder_does(family, fmt):
    """All of a prompt's tokens per pass over the weights (4 at a time, so 7 and 13 leave tails),
    left padding included: the decoder's prefill, the same cache, the same next positions."""
    model = in_format(tiny(family), fmt)
    fast = FastGenerator(model)
    decoder = fast.decoder
    for length, pad in ((1, 0), (7, 0), (13, 5)):
        ids = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
        mask = torch.ones_like(ids)
        mask[:, :pad] = 0
        with torch.inference_mode():
            mine, theirs = decoder.new_cache(1, 64, torch.device("cpu")), fast._cache(1, 64)
            want, want_next = decoder.prefill(mine, ids, mask)
            got, got_next = fast._prefill(theirs, ids, mask)
        # fp32 activations in both; int8 weight-only's eager prefill rounds them to bf16
        tol = 1e-5 if fmt == "fp32" else 2e-2
        assert float((got - want).abs().max() / want.abs().max()) < tol
        assert torch.equal(got_next, want_next) and torch.equal(theirs.valid, mine.valid)
        real = mask[0].bool()
        for a, b in zip(theirs.k + theirs.v, mine.k + mine.v, strict=True):
            torch.testing.assert_close(a[:, :, :length][:, :, real], b[:, :, :length][:, :, real],
                                       atol=tol, rtol=tol)
    assert fast.stats["prompt_compiles"] == 0  # nothing compiled for them


def test_where_it_cannot_run_the_generator_says_why_and_explicit_requests_raise(monkeypatch):
    odd = tiny("gpt2", activation_function="gelu_fast")
    reason = NativeStep.unavailable(FastGenerator(odd, compile=False).decoder)
    assert reason and ("gelu_fast" in reason or reason == WHY)
    auto = FastGenerator(odd)
    assert auto._native is None and auto.stats["decode_step"].startswith("compiled (native step "
                                                                          "unavailable")
    with pytest.raises(ValueError, match="native_step=True, but .*leave native_step unset"):
        FastGenerator(odd, native_step=True)
    with pytest.raises(ValueError, match="compile=False: the eager decoder is the reference"):
        FastGenerator(tiny("gpt2"), compile=False, native_step=True)
    off = FastGenerator(tiny("gpt2"), native_step=False)
    assert off._native is None and off.stats["decode_step"] == "compiled (native step off)"
    monkeypatch.setattr(kernels, "unavailable", lambda: "this CPU has no AVX512_BF16")
    with pytest.raises(ValueError, match="no AVX512_BF16"):
        FastGenerator(tiny("gpt2"), native_step=True)
