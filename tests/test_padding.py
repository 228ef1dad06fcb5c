import pytest
import torch
from conftest import no_compile, tiny_model

from torchbridge.models.text import TextModelOptimizer
from torchbridge.pipeline.padding import (
    LENGTH_BUCKET,
    plan_groups,
    trims_padding,
    wrap_trim_padding,
)
from torchbridge.pipeline.verify import padded_batch


def test_groups_cover_every_row_once_and_full_batches_stay_whole():
    lengths = [5, 128, 17, 64, 120, 9, 33, 128]
    groups = plan_groups(lengths)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    assert len(plan_groups([128] * 8)) == 1
    assert len(plan_groups([128, 4, 4, 4, 4, 4, 4, 4], overhead=8)) == 2
    # with no call overhead every distinct length gets its own group
    assert len(plan_groups([10, 20, 30], overhead=0)) == 3


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification",
                                  "question-answering", "masked-lm", "feature-extraction"])
def test_trimmed_outputs_equal_the_padded_ones_at_real_positions(task):
    model = tiny_model("bert", task)
    calls = []
    trimmed = wrap_trim_padding(tiny_model("bert", task), task)
    inner_embeddings = trimmed.bert.embeddings if hasattr(trimmed, "bert") else trimmed.embeddings
    inner_embeddings.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape[:2])))
    batch = padded_batch(model.config, 6, 48)
    batch["attention_mask"][3:] = 0
    batch["attention_mask"][3:, :3] = 1  # three short rows: worth a group of their own
    with torch.no_grad():
        ref, out = model(**batch), trimmed(**batch)
    # the short rows run at the length bucket (16), not at 48; widths stay on the bucket grid
    assert len(calls) >= 2 and max(c[1] for c in calls) == 48 and min(c[1] for c in calls) == 16
    assert all(c[1] % LENGTH_BUCKET == 0 for c in calls)
    mask = batch["attention_mask"].bool()
    for key, value in ref.items():
        if value.dim() >= 2 and value.shape[:2] == mask.shape:
            torch.testing.assert_close(out[key][mask], value[mask], atol=1e-5, rtol=1e-5)
            assert out[key].shape == value.shape
        else:
            torch.testing.assert_close(out[key], value, atol=1e-5, rtol=1e-5)


def test_left_padding_and_labels_pass_through():
    model = wrap_trim_padding(tiny_model("bert", "sequence-classification"), "sequence-classification")
    calls = []
    model.bert.embeddings.register_forward_hook(lambda m, i, o: calls.append(o.shape[1]))
    left = padded_batch(model.config, 4, 20, left_pad=True)
    with torch.no_grad():
        model(**left)
        model(**padded_batch(model.config, 4, 20), labels=torch.tensor([0, 1, 0, 1]))
    assert calls == [20, 20]


def test_optimizer_trims_encoders_only_and_can_be_switched_off():
    opt = TextModelOptimizer(no_compile())
    assert trims_padding(opt.optimize(tiny_model("bert", "token-classification")))
    assert opt.get_optimization_info()["trim_padding"]
    assert opt.get_optimization_info()["verify"]["passed"]
    assert not trims_padding(opt.optimize(tiny_model("gpt2", "causal-lm")))
    off = TextModelOptimizer(no_compile(trim_padding=False))
    assert not trims_padding(off.optimize(tiny_model("bert", "token-classification")))
