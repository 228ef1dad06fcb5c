"""oneDNN-packed linears (pipeline/packing.py): same outputs, plain checkpoints, when applied."""

import copy

import pytest
import torch
from conftest import tiny_model

from torchbridge.backends import detect, device_ops
from torchbridge.models.text import TextModelConfig, TextModelOptimizer
from torchbridge.pipeline.packing import PackedLinear, fastest_rows_hint, pack_linear_weights
from torchbridge.pipeline.plan import make_plan

pytestmark = pytest.mark.skipif(not device_ops(detect("cpu")).packs_linear_weights,
                                reason="this torch build has no oneDNN (mkldnn)")


def test_packed_linear_computes_what_the_plain_one_does():
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 48).to(torch.bfloat16)
    packed = PackedLinear(plain, rows_hint=16)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(packed(x).float(), plain(x).float(), atol=2e-2, rtol=1e-2)
    assert torch.equal(packed.weight, plain.weight)  # the plain tensor comes back exactly
    clone = copy.deepcopy(packed)
    assert torch.equal(clone.weight, plain.weight) and clone.packed is not packed.packed


def test_tied_weights_stay_plain_and_the_checkpoint_is_ordinary(tmp_path):
    model = tiny_model("bert", "masked-lm").to(torch.bfloat16)
    n, layouts = pack_linear_weights(model, rows=16)
    assert n == 2 * 6 + 1  # six projections per layer + the head's transform; not the tied decoder
    assert type(model.cls.predictions.decoder) is torch.nn.Linear
    model.save_pretrained(tmp_path)
    from transformers import BertForMaskedLM

    loaded = BertForMaskedLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    for name, value in saved.items():
        assert torch.equal(value, back[name]), name


def test_the_layout_is_chosen_per_weight_shape_by_timing(monkeypatch):
    import torchbridge.pipeline.packing as packing

    model = tiny_model("bert", "sequence-classification").to(torch.bfloat16)
    timed = []

    def fake_choice(weight, rows):
        timed.append(tuple(weight.shape))
        return 1 if weight.shape[0] == weight.shape[1] else rows

    monkeypatch.setattr(packing, "fastest_rows_hint", fake_choice)
    n, layouts = pack_linear_weights(model, rows=64)
    assert sorted(timed) == sorted(set(timed))  # timed once per shape, not once per linear
    assert set(layouts) == {f"{o}x{i}" for o, i in timed} and n > len(layouts)
    for m in model.modules():
        if isinstance(m, PackedLinear):
            assert m.rows_hint == (1 if m.in_features == m.out_features else 64)


def test_timing_picks_one_of_the_layouts():
    weight = torch.randn(48, 32, dtype=torch.bfloat16)
    assert fastest_rows_hint(weight, rows=1) == 1  # one row: one candidate, nothing timed
    assert fastest_rows_hint(weight, rows=64, runs=2) in (1, 64)
    # fp32 also times the plain weight (MKL's GEMM): None keeps the linear unpacked
    assert fastest_rows_hint(weight.float(), rows=64, runs=2) in (None, 1, 64)


def test_an_fp32_shape_whose_plain_weight_is_faster_stays_a_plain_linear(monkeypatch):
    import torchbridge.pipeline.packing as packing

    model = tiny_model("bert", "sequence-classification")
    monkeypatch.setattr(packing, "fastest_rows_hint",
                        lambda weight, rows: None if weight.shape[0] == weight.shape[1] else rows)
    n, layouts = pack_linear_weights(model, rows=64)
    square = [m for m in model.modules() if type(m) is torch.nn.Linear
              and m.in_features == m.out_features]
    assert square and n > 0 and all(v is None for k, v in layouts.items()
                                     if k.split("x")[0] == k.split("x")[1])
    assert all(m.rows_hint == 64 and m.in_features != m.out_features
               for m in model.modules() if isinstance(m, PackedLinear))


def test_a_compiled_graph_calls_the_packed_kernel():
    torch.manual_seed(0)
    plain = torch.nn.Linear(64, 48).to(torch.bfloat16)
    packed = PackedLinear(plain, rows_hint=1)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    compiled = torch.compile(packed, fullgraph=True, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).float(), packed(x).float())


def test_the_optimizer_packs_plain_bf16_and_fp32_encoders_only():
    model = tiny_model("bert", "sequence-classification")
    opt = TextModelOptimizer(TextModelConfig(use_torch_compile=False, dtype=torch.bfloat16,
                                             device="cpu"))
    optimized = opt.optimize(model)
    assert any(isinstance(m, PackedLinear) for m in optimized.modules())
    assert opt.report.verify.passed
    step = next(s for s in opt.report.steps if s.name == "packed weights")
    assert step.applied and "oneDNN" in step.detail
    cpu = detect("cpu")
    assert make_plan(TextModelConfig(dtype=torch.float32), device=detect("cpu")).pack_weights[0]
    for config, why in ((TextModelConfig(dtype=torch.bfloat16, quantization="int8-dynamic"),
                         "only plain bf16 and fp32"),
                        (TextModelConfig(dtype=torch.bfloat16, use_torch_compile=True),
                         "freezing"),
                        (TextModelConfig(dtype=torch.bfloat16, use_amp=True), "autocast")):
        pack, reason = make_plan(config, device=cpu).pack_weights
        assert not pack and why in reason, (config, reason)
