import random

import pytest
import torch
from conftest import no_compile, tiny_model

from torchbridge.models.text import TextModelOptimizer
from torchbridge.pipeline.padding import (
    CALL_OVERHEAD_TOKENS,
    LENGTH_BUCKET,
    bucketed,
    plan_groups,
    row_counts,
    trims_padding,
    wrap_trim_padding,
)
from torchbridge.pipeline.verify import padded_batch


def _allowed(n: int) -> bool:
    return n in row_counts(n)


def test_groups_cover_every_row_once_and_full_batches_stay_whole():
    lengths = [5, 128, 17, 64, 120, 9, 33, 128]
    groups = plan_groups(lengths)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    assert len(plan_groups([128] * 8)) == 1
    assert plan_groups([128] + [4] * 8, overhead=8) == [[0], list(range(1, 9))]
    # with no call overhead every distinct length gets its own group
    assert len(plan_groups([10, 20, 30], overhead=0)) == 3


def test_row_counts_are_powers_of_two_and_three_times_them():
    assert row_counts(50) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48]


def test_group_row_counts_are_allowed_counts_or_the_whole_batch():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 100)
        lengths = [rng.randint(1, 512) for _ in range(n)]
        groups = plan_groups(lengths)
        assert sorted(r for g in groups for r in g) == list(range(n))
        assert all(_allowed(len(g)) or len(g) == n for g in groups)


def test_trimmed_forwards_meet_a_bounded_set_of_shapes():
    """Batches of random lengths (16 rows, as the data layer sends) reach the model in few shapes:
    widths on the bucket grid, row counts from ``row_counts``; unbounded, they grew oneDNN's
    caches."""
    model = wrap_trim_padding(tiny_model("bert", "feature-extraction"), "feature-extraction",
                              overhead=CALL_OVERHEAD_TOKENS)
    shapes = set()
    model.embeddings.register_forward_hook(lambda m, i, o: shapes.add(tuple(o.shape[:2])))
    rng = random.Random(0)
    limit = model.config.max_position_embeddings
    for seed in range(80):
        lengths = sorted((rng.randint(1, limit) for _ in range(16)), reverse=True)
        batch = padded_batch(model.config, 16, bucketed(lengths[0], limit), seed=seed)
        batch["attention_mask"].zero_()
        for row, n in enumerate(lengths):
            batch["attention_mask"][row, :n] = 1
        with torch.no_grad():
            model(**batch)
    assert all(_allowed(rows) and width % LENGTH_BUCKET == 0 for rows, width in shapes)
    # at most 8 row counts (1..16) x 8 widths (16..128), over 80 batches of random lengths
    assert len(shapes) <= len(row_counts(16)) * (limit // LENGTH_BUCKET)


@pytest.mark.parametrize("task", ["sequence-classification", "token-classification",
                                  "question-answering", "masked-lm", "feature-extraction"])
def test_trimmed_outputs_equal_the_padded_ones_at_real_positions(task):
    model = tiny_model("bert", task)
    calls = []
    # a small call overhead: this 6 x 48 batch is split, which is what the test is about
    trimmed = wrap_trim_padding(tiny_model("bert", task), task, overhead=16)
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


def test_call_overhead_grows_as_the_model_narrows():
    from transformers import BertConfig, DistilBertConfig

    from torchbridge.pipeline.padding import call_overhead_tokens

    assert call_overhead_tokens(BertConfig(hidden_size=768)) == CALL_OVERHEAD_TOKENS
    assert call_overhead_tokens(BertConfig(hidden_size=1024)) == CALL_OVERHEAD_TOKENS  # floor
    assert call_overhead_tokens(BertConfig(hidden_size=384)) == 4 * CALL_OVERHEAD_TOKENS
    assert call_overhead_tokens(DistilBertConfig(dim=384)) == 4 * CALL_OVERHEAD_TOKENS
