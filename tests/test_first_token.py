"""A first-token classifier's last layer computes only the rows its head reads
(pipeline/first_token.py): the same logits, the encoder on its own untouched."""

import copy

import pytest
import torch
from conftest import no_compile, tiny_model

from torchbridge.backends import detect, device_ops
from torchbridge.models.text import TextModelOptimizer
from torchbridge.pipeline.first_token import FirstTokenLayer

pytestmark = pytest.mark.skipif(not device_ops(detect("cpu")).packs_linear_weights,
                                reason="this torch build has no oneDNN (mkldnn)")


def _optimized(model_type: str, task: str = "sequence-classification", **fields):
    size = {"dim": 64, "n_heads": 4} if model_type == "distilbert" \
        else {"hidden_size": 64, "num_attention_heads": 4}
    reference = tiny_model(model_type, task, **size)
    fields = fields or {"dtype": torch.bfloat16}
    opt = TextModelOptimizer(no_compile(device="cpu", **fields))
    return reference, opt.optimize(copy.deepcopy(reference)), opt.report


def _batch(left_padded: bool = False):
    ids = torch.randint(5, 99, (4, 19), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 9:], mask[2, 3:] = 0, 0
    if left_padded:
        mask[3, :5] = 0  # its first position is padding
    return ids, mask


def _last_ffn_rows(model) -> list[int]:
    last = next(m for m in model.modules() if isinstance(m, FirstTokenLayer))
    seen = []
    ffn = last.ffn if last.distilbert else last.intermediate
    ffn.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[-2]))
    return seen


@pytest.mark.parametrize(("model_type", "fields"), [
    ("bert", {}), ("roberta", {}), ("distilbert", {}), ("bert", {"quantization": "int8-static"})])
@pytest.mark.parametrize("left_padded", [False, True])
def test_the_last_layer_keeps_the_first_rows_and_the_logits_do_not_move(monkeypatch, model_type,
                                                                        fields, left_padded):
    reference, model, report = _optimized(model_type, **fields)
    step = next(s for s in report.steps if s.name == "packed weights")
    assert "the last layer computes only each sequence's first token" in step.detail
    monkeypatch.setattr("torchbridge.pipeline.first_token.first_token_only", lambda model: False)
    _, every_row, _ = _optimized(model_type, **fields)
    assert not any(isinstance(m, FirstTokenLayer) for m in every_row.modules())
    rows = _last_ffn_rows(model)
    ids, mask = _batch(left_padded)
    with torch.no_grad():
        for m in (torch.ones_like(ids), mask):  # dense, then with padding removed
            got = model(input_ids=ids, attention_mask=m).logits.float()
            # each row of a GEMM is computed alike with fewer rows: the same logits
            torch.testing.assert_close(got, every_row(input_ids=ids, attention_mask=m).logits.float(),
                                       atol=1e-3, rtol=1e-3)
            if not left_padded and not fields:  # a padded first position reads zeros once
                want = reference(input_ids=ids, attention_mask=m).logits  # padding is removed
                torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
        # asking for the hidden states computes every row of the last layer
        model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    firsts = 3 if left_padded else 4  # packed rows at a sequence's first position
    assert rows == [1, firsts, ids.shape[1]]


def test_only_the_classifier_asks_the_encoder_alone_and_training_compute_every_row():
    _, model, _ = _optimized("bert")
    rows = _last_ffn_rows(model)
    ids, _ = _batch()
    with torch.no_grad():
        hidden = model.bert(input_ids=ids).last_hidden_state
        assert hidden.shape == (4, 19, 64) and hidden[0, 5].abs().sum() > 0
        model.train()
        model(input_ids=ids)
    assert rows == [19, 19]


@pytest.mark.parametrize("task", ["feature-extraction", "token-classification"])
def test_models_that_read_every_token_keep_every_row(task):
    _, model, report = _optimized("bert", task)
    assert not any(isinstance(m, FirstTokenLayer) for m in model.modules())
    step = next(s for s in report.steps if s.name == "packed weights")
    assert "first token" not in step.detail


def test_the_checkpoint_keeps_its_names(tmp_path):
    reference, model, _ = _optimized("bert")
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_decoder_inputs_are_refused_not_ignored():
    _, model, _ = _optimized("bert")
    last = next(m for m in model.modules() if isinstance(m, FirstTokenLayer))
    hidden = torch.zeros(1, 3, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="encoder_hidden_states must be None"):
        last(hidden, None, hidden)
    with pytest.raises(ValueError, match="past_key_values must be None"):
        last(hidden, past_key_values=object())
