"""Continuous batching: requests joining a running decode batch give the tokens that `generate`
gives each of them alone (greedy), and slots are freed and reused."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from torchbridge.generation.continuous import ContinuousBatcher, GenerationRequest


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 9, 5, 14, 1, 7, 11, 4][:n]
    return [torch.randint(2, 97, (k,), generator=g).tolist() for k in lengths]


def _reference(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _run(batcher: ContinuousBatcher, requests: list[GenerationRequest], join_at: list[int]):
    """Admit request i once `join_at[i]` steps have run (and a slot is free); step until done."""
    pending = list(zip(join_at, requests, strict=True))
    done: list[GenerationRequest] = []
    max_rows = 0
    while pending or batcher.active:
        for item in list(pending):
            if item[0] <= batcher.steps and batcher.free_slots:
                pending.remove(item)
                for ev in batcher.add(item[1]):
                    if ev.finish_reason:
                        done.append(ev.request)
        for ev in batcher.step():
            if ev.finish_reason:
                done.append(ev.request)
        max_rows = max(max_rows, batcher.last_step_rows)
        if not batcher.active and pending:
            batcher.steps += 1  # idle: let the clock run to the next join
    return done, max_rows


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_generate_with_requests_joining_mid_run(family):
    # eos outside the vocabulary: every request runs to its own max_new_tokens, so requests of
    # different lengths finish at different steps and later ones take over their slots
    model = tiny_model(family, "causal-lm", eos_token_id=1000, pad_token_id=0)
    batcher = ContinuousBatcher(model, slots=4, max_length=64)
    prompts = _prompts(8)
    new = [12, 5, 20, 8, 16, 3, 10, 7]
    requests = [GenerationRequest(p, n, {"do_sample": False}) for p, n in zip(prompts, new,
                                                                              strict=True)]
    done, max_rows = _run(batcher, requests, join_at=[0, 0, 2, 3, 4, 9, 9, 15])
    assert len(done) == 8 and max_rows > 1
    assert {r.slot for r in requests} <= set(range(4))
    for req, prompt, n in zip(requests, prompts, new, strict=True):
        assert req.finish_reason == "length"
        assert req.tokens == _reference(model, prompt, n), prompt
    assert batcher.active == 0 and batcher.free_slots == 4


def test_eos_and_cancel_free_the_slot():
    model = tiny_model("gpt2", "causal-lm", pad_token_id=0)
    prompt = _prompts(1)[0]
    ref = _reference(model, prompt, 30)
    batcher = ContinuousBatcher(model, slots=1, max_length=64)
    # make the 4th greedy token the eos: the request stops there with reason "stop"
    model.generation_config.eos_token_id = ref[3]
    req = GenerationRequest(prompt, 30, {"do_sample": False})
    batcher.add(req)
    while batcher.active:
        batcher.step()
    first = ref.index(ref[3])
    assert req.finish_reason == "stop" and req.tokens == ref[:first + 1]
    model.generation_config.eos_token_id = 1000
    long = GenerationRequest(prompt, 30, {"do_sample": False})
    batcher.add(long)
    batcher.step()
    long.cancel()
    events = batcher.step()
    assert [e.finish_reason for e in events] == ["cancelled"] and batcher.free_slots == 1
    assert len(long.tokens) == 2


def test_seeded_sampling_is_reproducible_and_oversize_is_refused():
    model = tiny_model("llama", "causal-lm", eos_token_id=1000, pad_token_id=0)
    batcher = ContinuousBatcher(model, slots=2, max_length=32)
    kw = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "top_k": 0}
    a, b = (GenerationRequest([5, 6, 7], 10, kw, seed=7) for _ in range(2))
    batcher.add(a)
    batcher.add(b)
    while batcher.active:
        batcher.step()
    assert a.tokens == b.tokens and len(a.tokens) == 10
    with pytest.raises(ValueError, match="exceeds the 32 tokens"):
        batcher.add(GenerationRequest(list(range(2, 30)), 10, {}))
