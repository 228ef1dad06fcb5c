"""The library on an accelerator: every path that differs there (native half precision, fp8,
CUDA graphs in the compiled decode step, device memory counters, serving and batch jobs on the
device), checked against the fp32 eager model on the CPU.

Skipped on machines without one. `TORCHBRIDGE_TEST_DEVICE=cpu` runs the same checks on the CPU
(to test the tests); `scripts/gpu_check.sh` runs them on a lent GPU.
"""

from __future__ import annotations

import asyncio
import os

import httpx
import numpy as np
import pytest
import torch
from conftest import tiny_model

from torchbridge.backends import detect
from torchbridge.models.text import TextModelConfig, TextModelOptimizer
from torchbridge.precisions import PrecisionNotSupportedError, check_supported


def _device() -> str | None:
    asked = os.environ.get("TORCHBRIDGE_TEST_DEVICE")
    if asked:
        return asked
    info = detect("auto")
    return None if info.type == "cpu" else str(info.torch_device)


DEVICE = _device()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="no accelerator here "
                                                  "(set TORCHBRIDGE_TEST_DEVICE to force one)")]
INFO = detect(DEVICE) if DEVICE else None


def _batch(seed: int = 0, rows: int = 4, length: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 95, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, rows):  # right padding, rows of decreasing length
        mask[i, length - 5 * i:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _cosines(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out, ref = out.float().cpu(), ref.float()
    if out.dim() == 3:
        keep = mask.bool()
        out, ref = out[keep], ref[keep]
    return torch.nn.functional.cosine_similarity(out, ref, dim=-1)


def _optimize(model: torch.nn.Module, task: str, **config) -> tuple[torch.nn.Module, dict]:
    opt = TextModelOptimizer(TextModelConfig(device=DEVICE, **config))
    out = opt.optimize(model, task=task)
    return out, opt.get_optimization_info()


@pytest.mark.parametrize("model_type,task", [("bert", "sequence-classification"),
                                             ("distilbert", "token-classification"),
                                             ("roberta", "feature-extraction")])
def test_default_mode_on_the_device_matches_fp32_eager(model_type, task):
    reference = tiny_model(model_type, task)
    batch = _batch()
    with torch.no_grad():
        want = reference(**batch)[0]
    model, info = _optimize(reference, task)
    assert info["verify"]["passed"], info["verify"]
    assert str(next(model.parameters()).device).startswith(INFO.torch_device.type)
    # the auto choice on an accelerator is its native half precision, and it compiles
    assert info["dtype"] in ("torch.bfloat16", "torch.float16", "bfloat16", "float16") \
        or info.get("amp_dtype") in ("torch.bfloat16", "torch.float16"), info["dtype"]
    with torch.no_grad():
        got = model(**{k: v.to(DEVICE) for k, v in batch.items()})[0]
    assert _cosines(got, want, batch["attention_mask"]).min() > 0.99


PRECISION_REQUESTS = [
    {"dtype": torch.float32},
    {"dtype": torch.float16},
    {"dtype": torch.bfloat16},
    {"dtype": torch.float8_e4m3fn},  # the guide's spelling of fp8 weights
    {"quantization": "int8-weight-only"},
    {"quantization": "int8-dynamic"},
]


@pytest.mark.parametrize("request_", PRECISION_REQUESTS, ids=lambda r: str(list(r.values())[0]))
def test_every_precision_passes_its_gate_or_says_why_not(request_):
    reference = tiny_model("bert", "sequence-classification")
    batch = _batch(seed=1)
    with torch.no_grad():
        want = reference(**batch)[0]
    name = request_.get("quantization") or {torch.float32: "fp32", torch.float16: "fp16",
                                            torch.bfloat16: "bf16",
                                            torch.float8_e4m3fn: "fp8-weight-only"}[request_["dtype"]]
    try:
        check_supported(name, INFO)
    except PrecisionNotSupportedError as err:  # an explicit request that cannot run raises
        with pytest.raises(PrecisionNotSupportedError, match=str(INFO.type)):
            _optimize(reference, "sequence-classification", use_torch_compile=False, **request_)
        pytest.skip(f"{name} not supported here: {err}")
    model, info = _optimize(reference, "sequence-classification", use_torch_compile=False,
                            **request_)
    assert info["verify"]["passed"], info["verify"]
    with torch.no_grad():
        got = model(**{k: v.to(DEVICE) for k, v in batch.items()})[0]
    assert _cosines(got, want, batch["attention_mask"]).min() > 0.98


def test_compiled_encoder_does_not_recompile_across_lengths():
    reference = tiny_model("bert", "feature-extraction")
    model, info = _optimize(reference, "feature-extraction", use_torch_compile=True,
                            warmup_seq_len=32)
    assert info["torch_compile"], info
    torch._dynamo.utils.counters.clear()
    for length in (7, 19, 33, 50):
        batch = _batch(seed=length, rows=3, length=length)
        with torch.no_grad():
            got = model(**{k: v.to(DEVICE) for k, v in batch.items()})[0]
            want = reference(**batch)[0]
        assert _cosines(got, want, batch["attention_mask"]).min() > 0.99
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fp32_compiled_decoding_equals_hf_greedy(family):
    """fp32 on the device through the compiled decode step (CUDA graphs on CUDA): the same
    tokens as HF's eager greedy decoding on the CPU."""
    reference = tiny_model(family, "causal-lm", eos_token_id=1000, pad_token_id=0)
    ids = torch.randint(2, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                  pad_token_id=0)
    model, info = _optimize(reference, "causal-lm", dtype=torch.float32)
    assert info["verify"]["passed"], info["verify"]
    got = model.generate(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE),
                         max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_default_mode_decoder_passes_its_gate_on_the_device(family):
    reference = tiny_model(family, "causal-lm", eos_token_id=1000, pad_token_id=0)
    model, info = _optimize(reference, "causal-lm")
    assert info["verify"]["passed"], info["verify"]
    ids = torch.randint(2, 97, (1, 5), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13) and out.device.type == INFO.torch_device.type


def test_continuous_batching_on_the_device_equals_generate():
    from torchbridge.generation.continuous import ContinuousBatcher, GenerationRequest

    model = tiny_model("gpt2", "causal-lm", eos_token_id=1000, pad_token_id=0).to(DEVICE)
    batcher = ContinuousBatcher(model, slots=4, max_length=64)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 97, (k,), generator=g).tolist() for k in (3, 9, 5, 12)]
    requests = [GenerationRequest(p, 10, {"do_sample": False}) for p in prompts]
    for r in requests:
        batcher.add(r)
    while batcher.active:
        batcher.step()
    for p, r in zip(prompts, requests, strict=True):
        ids = torch.tensor([p], device=DEVICE)
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                  do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        assert r.tokens == want


def test_peak_memory_is_read_from_the_device_allocator():
    from torchbridge.bench.harness import PeakMemory

    with PeakMemory(DEVICE) as mem:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device=DEVICE)
        del x
    if INFO.type == "cpu":
        pytest.skip("CPU peak memory is the process RSS: covered in test_benchmark")
    assert mem.value >= 64 * 2**20


def test_encode_and_http_embeddings_on_the_device(tiny_bert_dir):
    from serve_helpers import running

    from torchbridge.data.inference import encode
    from torchbridge.models.text import create_optimized_text_model
    from torchbridge.serve import ServeSettings, create_app

    texts = ["the movie is great", "i did not like it at all", "bad", "a good film"]
    cpu = create_optimized_text_model(str(tiny_bert_dir), task="feature-extraction",
                                      device="cpu", dtype=torch.float32, use_torch_compile=False)
    model = create_optimized_text_model(str(tiny_bert_dir), task="feature-extraction",
                                        device=DEVICE, use_torch_compile=False)
    want = encode(cpu, texts, normalize=True)
    got = encode(model, texts, normalize=True)
    assert (np.sum(got * want, axis=1) > 0.99).all()
    with running(create_app(model, ServeSettings(model_id="tiny", max_wait_ms=50))) as (url, _):
        async def post_all():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/embeddings", json={"input": t})
                                              for t in texts))
        replies = asyncio.run(post_all())
    assert [r.status_code for r in replies] == [200] * len(texts)
    served = np.array([r.json()["data"][0]["embedding"] for r in replies], dtype=np.float32)
    np.testing.assert_allclose(served, got, atol=1e-3)


def test_saved_folder_round_trip_on_the_device(tmp_path):
    reference = tiny_model("bert", "sequence-classification")
    opt = TextModelOptimizer(TextModelConfig(device=DEVICE, use_torch_compile=False))
    model = opt.optimize(reference, task="sequence-classification")
    opt.save_pretrained(model, str(tmp_path / "saved"), source="tiny-bert")
    again = TextModelOptimizer(TextModelConfig(device=DEVICE, use_torch_compile=False))
    loaded = again.optimize(str(tmp_path / "saved"), task="sequence-classification")
    batch = {k: v.to(DEVICE) for k, v in _batch(seed=2).items()}
    with torch.no_grad():
        assert torch.allclose(model(**batch)[0].float(), loaded(**batch)[0].float(), atol=1e-3)
    assert again.get_optimization_info()["dtype"] == opt.get_optimization_info()["dtype"]
