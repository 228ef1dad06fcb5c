"""oneDNN-packed bf16 linears (pipeline/packing.py): same outputs, plain checkpoints, when applied."""

import copy

import pytest
import torch
from conftest import tiny_model

from torchbridge.backends import detect, device_ops
from torchbridge.models.text import TextModelConfig, TextModelOptimizer
from torchbridge.pipeline.packing import PackedLinear, pack_linear_weights
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
    n = pack_linear_weights(model, rows_hint=16)
    assert n == 2 * 6 + 1  # six projections per layer + the head's transform; not the tied decoder
    assert type(model.cls.predictions.decoder) is torch.nn.Linear
    model.save_pretrained(tmp_path)
    from transformers import BertForMaskedLM

    loaded = BertForMaskedLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    for name, value in saved.items():
        assert torch.equal(value, back[name]), name


def test_the_optimizer_packs_plain_bf16_encoders_only():
    model = tiny_model("bert", "sequence-classification")
    opt = TextModelOptimizer(TextModelConfig(use_torch_compile=False, dtype=torch.bfloat16,
                                             device="cpu"))
    optimized = opt.optimize(model)
    assert any(isinstance(m, PackedLinear) for m in optimized.modules())
    assert opt.report.verify.passed
    step = next(s for s in opt.report.steps if s.name == "packed weights")
    assert step.applied and "oneDNN" in step.detail
    cpu = detect("cpu")
    for config, why in ((TextModelConfig(dtype=torch.float32), "only plain bf16"),
                        (TextModelConfig(dtype=torch.bfloat16, quantization="int8-dynamic"),
                         "only plain bf16"),
                        (TextModelConfig(dtype=torch.bfloat16, use_torch_compile=True),
                         "freezing"),
                        (TextModelConfig(dtype=torch.bfloat16, use_amp=True), "autocast")):
        pack, reason = make_plan(config, device=cpu).pack_weights
        assert not pack and why in reason, (config, reason)
