"""FastGenerator against HF generate and HF forward on tiny random-weight GPT-2 and Llama.

Eager cases (compile=False run the same functional decoder) cover semantics; two compiled cases
(one per family, shared across tests) cover the compiled decode step and recompilation counts.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.generation.streamers import BaseStreamer

from torchbridge.generation import FastGenerator, cache_length_bucket, verify_greedy
from torchbridge.generation.projections import Proj
from torchbridge.precisions.int8_weight_only import Int8WeightOnlyLinear, quantize_weights_int8, sqnr_db

EOS = 97


def tiny_gpt2(seed: int = 0) -> transformers.GPT2LMHeadModel:
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=256,
                                  bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=99,
                                   max_position_embeddings=256, bos_token_id=1,
                                   eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 9, 6, 3, left padded with pad id 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 97, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def compiled():
    """One compiled generator per family for the whole module (compiling costs ~10 s here)."""
    out = {}
    for name, build in BUILDERS.items():
        model = build()
        # the compiled step itself: one-sequence steps would otherwise run the native one
        out[name] = (model, FastGenerator(model, compile=True, native_step=False))
    return out


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.inference_mode()
def test_cached_decoding_equals_uncached_forward(family):
    model = BUILDERS[family]()
    fast = FastGenerator(model, compile=False)
    ids, mask = padded_batch()
    cont = torch.randint(2, 97, (3, 6), generator=torch.Generator().manual_seed(3))
    full_ids = torch.cat([ids, cont], 1)
    full_mask = torch.cat([mask, torch.ones_like(cont)], 1)
    ref = model(full_ids, attention_mask=full_mask, position_ids=hf_positions(full_mask)).logits

    dec = fast.decoder
    cache = dec.new_cache(3, 64, torch.device("cpu"))
    logits, pos = dec.prefill(cache, ids, mask)
    got = [logits]
    for j in range(cont.shape[1] - 1):
        cache_pos = torch.tensor([ids.shape[1] + j])
        got.append(dec.decode_step(cont[:, j], pos + j, cache_pos, cache.k, cache.v, cache.valid,
                                   gemv=False))
    got = torch.stack(got, 1)
    want = ref[:, ids.shape[1] - 1 : -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
def test_eager_greedy_equals_hf_generate_on_padded_batch(family):
    model = BUILDERS[family]()
    ids, mask = padded_batch()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    got = FastGenerator(model, compile=False).generate(ids, attention_mask=mask, max_new_tokens=24)
    assert torch.equal(got, ref)


@torch.inference_mode()
def test_left_padded_rows_equal_rows_alone(family):
    model = BUILDERS[family]()
    fast = FastGenerator(model, compile=False)
    ids, mask = padded_batch()
    batch = fast.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16)
    for r in range(3):
        alone = ids[r : r + 1, mask[r].bool()]
        row = fast.generate(alone, max_new_tokens=16, min_new_tokens=16)
        assert torch.equal(batch[r, ids.shape[1] :], row[0, alone.shape[1] :])


@torch.inference_mode()
def test_hf_semantics_eos_pad_min_new_tokens_repetition_penalty(family):
    model = BUILDERS[family]()
    ids, mask = padded_batch(1)
    kw = dict(max_new_tokens=20, repetition_penalty=1.3)
    free = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, **kw)
    t = ids.shape[1]
    # EOS ids that the rows would emit early: rows then stop at different steps (padding after
    # EOS), and min_new_tokens=4 forbids the first of them at step 2.
    eos = [int(free[0, t + 2]), int(free[1, t + 7])]
    kw.update(eos_token_id=eos, min_new_tokens=4, pad_token_id=0)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    got = FastGenerator(model, compile=False).generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, ref)
    assert torch.isin(ref[:, t:], torch.tensor(eos)).any(), "the test needs an EOS to be emitted"


@torch.inference_mode()
def test_greedy_min_new_tokens_bans_eos_inside_the_step(family):
    """Greedy decoding with only a min-length rule takes the decode step's argmax with EOS
    banned there (no eager processor per token): HF's tokens, where the ban changes them."""
    model = BUILDERS[family]()
    ids, mask = padded_batch(2)
    t = ids.shape[1]
    free = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None,
                          max_new_tokens=12)
    kw = dict(max_new_tokens=12, eos_token_id=[int(free[0, t + 1]), int(free[2, t + 6])],
              pad_token_id=0, do_sample=False)
    for rule in (dict(min_new_tokens=5), dict(min_length=t + 5)):
        ref = model.generate(ids, attention_mask=mask, **kw, **rule)
        assert not torch.equal(ref, model.generate(ids, attention_mask=mask, **kw)), \
            "the test needs the ban to change the tokens"
        got = FastGenerator(model, compile=False).generate(ids, attention_mask=mask, **kw, **rule)
        assert torch.equal(got, ref)


@torch.inference_mode()
def test_compiled_greedy_equals_eager_and_compiles_once_per_bucket(family, compiled):
    model, fast = compiled[family]
    eager = FastGenerator(model, compile=False)
    prompt = torch.randint(2, 97, (1, 8), generator=torch.Generator().manual_seed(5))
    before = fast.stats["compiles"]
    long = fast.generate(prompt, max_new_tokens=200, min_new_tokens=200)
    assert long.shape == (1, 208)
    assert torch.equal(long, eager.generate(prompt, max_new_tokens=200, min_new_tokens=200))
    assert fast.stats["gemv_decode"] and fast.stats["cache_length"] == 256
    # Prompts of many lengths that fit the same cache bucket share one compiled step, and
    # prompts of any length > 1 one compiled prompt layer, once it has seen a second cache length.
    prompt_graphs = {}
    for n in (1, 2, 5, 13, 31, 40):
        p = torch.randint(2, 97, (1, n), generator=torch.Generator().manual_seed(n))
        got = fast.generate(p, max_new_tokens=12)
        assert torch.equal(got, eager.generate(p, max_new_tokens=12))
        assert torch.equal(got, model.generate(p, max_new_tokens=12, do_sample=False))
        prompt_graphs[n] = fast.stats["prompt_compiles"]
    assert prompt_graphs[2] == prompt_graphs[5] == prompt_graphs[13] == prompt_graphs[40] <= 3
    # One compilation per cache bucket: the step is traced once for (batch 1, cache 256) and
    # once for the shorter requests' cache of 64 (attention reads the whole cache every step).
    assert fast.stats["compiles"] - before == 2 and fast.stats["cache_length"] == 64


@torch.inference_mode()
def test_compiled_int8_dynamic_decoding_equals_eager():
    """int8-dynamic decoding: the compiled batch-1 step (each token quantized, its integer
    levels reduced against the int8 weights) gives the eager path's tokens."""
    from torchbridge.precisions.int8_dynamic import quantize_dynamic_int8

    model = quantize_dynamic_int8(BUILDERS["gpt2"]())
    fast = FastGenerator(model, compile=True, native_step=False)
    eager = FastGenerator(model, compile=False)
    prompt = torch.randint(2, 97, (1, 8), generator=torch.Generator().manual_seed(5))
    got = fast.generate(prompt, max_new_tokens=24, min_new_tokens=24)
    assert fast.stats["gemv_decode"] and fast.stats["compiles"] == 1
    assert torch.equal(got, eager.generate(prompt, max_new_tokens=24, min_new_tokens=24))


@torch.inference_mode()
def test_compiled_prompt_layer_keeps_layers_of_different_formats_apart():
    """A layer left in float (as the accuracy control leaves some) among int8 ones: the compiled
    prompt layer, one graph shared by the layers, keeps its guards on the layer's weights, so
    the float layer gets a graph of its own and the prompt's logits and cache match the eager
    prefill's (a graph reused across formats would read the float weight as int8)."""
    model = quantize_weights_int8(tiny_gpt2(), skip=["transformer.h.1.mlp.c_fc"])
    fast, eager = FastGenerator(model, native_step=False), FastGenerator(model, compile=False)
    prompt = torch.randint(2, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    fast_cache, eager_cache = fast._cache(1, 16), eager._cache(1, 16)
    got, _ = fast._prefill(fast_cache, prompt, mask)
    want, _ = eager._prefill(eager_cache, prompt, mask)
    assert fast.stats["prompt_compiles"] == 2 and eager.stats["prompt_compiles"] == 0
    with pytest.raises(ValueError, match="compile_prompt=True needs compile=True"):
        FastGenerator(model, compile=False, compile_prompt=True)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for mine, theirs in zip(fast_cache.v, eager_cache.v, strict=True):
        torch.testing.assert_close(mine[:, :, :12], theirs[:, :, :12], rtol=1e-3, atol=1e-3)


@torch.inference_mode()
def test_verify_greedy_reports_agreement(compiled):
    model, fast = compiled["gpt2"]
    prompt = torch.randint(2, 97, (1, 8), generator=torch.Generator().manual_seed(7))
    res = verify_greedy(fast, model, prompt, None, max_new_tokens=20)
    assert res["identical"] and res["agreement"] == 1.0 and res["first_divergence"] is None
    assert res["teacher_forced_agreement"] == 1.0
    # A model that is not the same model must be caught.
    other = tiny_gpt2(seed=1)
    res = verify_greedy(fast, other, prompt, None, max_new_tokens=20)
    assert res["agreement"] < 0.5 and res["first_divergence"] is not None


@torch.inference_mode()
def test_sampling_seeded_reproducible_and_matches_hf():
    model = tiny_gpt2()
    fast = FastGenerator(model, compile=False)
    ids = torch.randint(2, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=15, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a = fast.generate(ids, generator=torch.Generator().manual_seed(123), **kw)
    b = fast.generate(ids, generator=torch.Generator().manual_seed(123), **kw)
    c = fast.generate(ids, generator=torch.Generator().manual_seed(124), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Global seed: same processors in HF's order and the same multinomial draw as HF's _sample.
    torch.manual_seed(9)
    ref = model.generate(ids, **kw)
    torch.manual_seed(9)
    assert torch.equal(fast.generate(ids, **kw), ref)


@torch.inference_mode()
def test_top_k_1_equals_greedy():
    model = tiny_llama()
    fast = FastGenerator(model, compile=False)
    ids, mask = padded_batch()
    greedy = fast.generate(ids, attention_mask=mask, max_new_tokens=12)
    sampled = fast.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=1,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, sampled)


@torch.inference_mode()
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.6)])
def test_sampling_distribution(temperature, top_p):
    """First-token frequencies over 3000 draws follow softmax(logits / T) cut to the top-p
    nucleus (total variation distance small), and not the untempered distribution."""
    model = tiny_gpt2()
    with torch.no_grad():  # ln_f bias is 0: this scales the logits, making them peaky enough
        model.transformer.ln_f.weight.mul_(6.0)  # for temperature to matter beyond noise
    fast = FastGenerator(model, compile=False)
    ids = torch.tensor([[5, 17, 33]])
    n = 3000
    out = fast.generate(ids, max_new_tokens=1, do_sample=True, top_k=0, temperature=temperature,
                        top_p=top_p, num_return_sequences=n,
                        generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out[:, -1], minlength=99).double() / n
    logits = model(ids).logits[0, -1].double()
    probs = (logits / temperature).softmax(-1)
    if top_p < 1.0:
        sp, si = probs.sort(descending=True)
        keep = (sp.cumsum(0) - sp) < top_p  # HF keeps tokens until the mass before them >= top_p
        nucleus = torch.zeros_like(probs, dtype=torch.bool)
        nucleus[si[keep]] = True
        assert 1 < int(nucleus.sum()) < 60
        assert freq[~nucleus].sum() == 0, "sampled a token outside the top-p nucleus"
        probs = torch.where(nucleus, probs, 0.0)
        probs /= probs.sum()
    tv = float(0.5 * (freq - probs).abs().sum())
    # Expected total variation of n draws from `probs` itself (normal approximation).
    noise = float(0.5 * (2 / (torch.pi * n)) ** 0.5 * (probs * (1 - probs)).sqrt().sum())
    assert tv < 1.5 * noise + 0.01, f"total variation {tv:.3f} vs sampling noise {noise:.3f}"
    if temperature != 1.0 or top_p < 1.0:
        untempered = float(0.5 * (freq - logits.softmax(-1)).abs().sum())
        assert untempered > 2 * tv + 0.05, f"indistinguishable from plain sampling ({untempered})"


class Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.flatten().tolist())

    def end(self) -> None:
        self.ended = True


@torch.inference_mode()
def test_streamer_receives_what_hf_sends():
    model = tiny_gpt2()
    ids = torch.randint(2, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    ref, got = Recorder(), Recorder()
    model.generate(ids, max_new_tokens=10, do_sample=False, streamer=ref)
    FastGenerator(model, compile=False).generate(ids, max_new_tokens=10, streamer=got)
    assert got.puts == ref.puts and got.ended and len(got.puts) == 11


def test_unsupported_arguments_raise():
    fast = FastGenerator(tiny_gpt2(), compile=False)
    ids = torch.tensor([[3, 4, 5]])
    for bad in ({"num_beams": 2}, {"output_scores": True}, {"no_repeat_ngram_size": 2}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            fast.generate(ids, max_new_tokens=3, **bad)
    with pytest.raises(ValueError, match="num_return_sequences"):
        fast.generate(ids, max_new_tokens=3, num_return_sequences=2)
    with pytest.raises(ValueError, match="right padding"):
        fast.generate(ids, attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=3)
    model = tiny_gpt2()
    model.generation_config.num_beams = 4
    with pytest.raises(ValueError, match="num_beams"):
        FastGenerator(model, compile=False).generate(ids, max_new_tokens=3)
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
        vocab_size=99))
    assert not FastGenerator.supports(bert)
    with pytest.raises(ValueError, match="gpt2"):
        FastGenerator(bert)


def test_max_length_and_defaults_follow_hf():
    model = tiny_gpt2()
    fast = FastGenerator(model, compile=False)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.inference_mode():
        for kw in ({"max_length": 11}, {}, {"max_new_tokens": 5, "max_length": 50}):
            kw = dict(kw, min_new_tokens=30)
            assert torch.equal(fast.generate(ids, **kw), model.generate(ids, do_sample=False, **kw))
    assert cache_length_bucket(1) == 64 and cache_length_bucket(65) == 128


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_gemv_form_matches_linear(precision):
    """The decode-step projection (reduction form, in GEMV_STREAMS row blocks: 29 rows do not
    divide evenly) equals the GEMM form for each weight dtype."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(37, 29)
    if precision == "int8":
        proj = Proj.from_module(Int8WeightOnlyLinear.from_float(lin))
    elif precision == "bf16":
        proj = Proj.from_module(lin.to(torch.bfloat16))
    else:
        proj = Proj.from_module(lin)
    x = torch.randn(1, 1, 37)
    torch.testing.assert_close(proj(x, gemv=True), proj(x, gemv=False), atol=2e-2, rtol=2e-2)
    ref = torch.nn.functional.linear(x, lin.weight.float(), lin.bias.float())
    assert sqnr_db(ref, proj(x, gemv=True)) > 30


@torch.inference_mode()
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_decoding_close_to_fp32(family, precision):
    """Logits of cached decoding with bf16 or int8 weights stay close to the fp32 HF forward."""
    ref_model = BUILDERS[family]()
    model = BUILDERS[family]()
    model = model.to(torch.bfloat16) if precision == "bf16" else quantize_weights_int8(model)
    fast = FastGenerator(model, compile=False)
    ids, mask = padded_batch()
    logits, _ = fast.decoder.prefill(fast.decoder.new_cache(3, 64, torch.device("cpu")), ids, mask)
    ref = ref_model(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits[:, -1]
    assert sqnr_db(ref, logits) > 20
    res = verify_greedy(fast, ref_model, ids, mask, max_new_tokens=16)
    assert res["agreement"] >= 0.5


def test_teacher_forced_agreement_ignores_positions_after_eos():
    """A row that stops at EOS is padded after it: those pads are not the model's predictions,
    so they must not count against the teacher-forced agreement (an fp32 twin scores 1.0)."""
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # decisive logits, varied continuations
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids = torch.tensor([[5, 17, 33, 2], [8, 41, 9, 60]])
    with torch.no_grad():
        free = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                              do_sample=False, pad_token_id=0)[:, 4:].tolist()
    # a token only one row makes, mid-way: that row stops there and is padded, the other runs on
    row, stop = next((r, t) for r in (0, 1) for t in free[r][2:10] if t not in free[1 - r])
    model.generation_config.eos_token_id = stop
    model.generation_config.pad_token_id = 0
    fast = FastGenerator(model, compile=False)
    res = verify_greedy(fast, model, ids, None, max_new_tokens=12)
    new = res["reference_tokens"][row, 4:].tolist()
    assert len(new) == 12 and new.index(stop) < 10  # stopped, then padded to the other row's end
    assert res["identical"] and res["teacher_forced_agreement"] == 1.0, res
