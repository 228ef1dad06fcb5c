import copy

import pytest
import torch
from conftest import no_compile, tiny_model

from torchbridge.models.text import TextModelOptimizer
from torchbridge.pipeline.loading import ModelNotAvailableError
from torchbridge.pipeline.verify import VerificationError, padded_batch

TASKS = ["sequence-classification", "token-classification", "question-answering", "masked-lm",
         "feature-extraction"]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model_type", ["bert", "distilbert", "roberta", "albert"])
def test_every_encoder_task_matches_fp32_eager(model_type, task):
    model = tiny_model(model_type, task)
    optimizer = TextModelOptimizer(no_compile(dtype=torch.float32))
    optimized = optimizer.optimize(model, task=task)
    info = optimizer.get_optimization_info()
    assert info["verify"]["passed"] and info["verify"]["measures"]["min_cosine"] > 0.999999
    assert info["efficient_attention"] and info["attention_implementation"] == "sdpa"
    batch = padded_batch(model.config, 3, 12)
    with torch.no_grad():
        ref, out = model(**batch), optimized(**batch)
    key = "start_logits" if task == "question-answering" else (
        "last_hidden_state" if task == "feature-extraction" else "logits")
    mask = batch["attention_mask"].bool()
    real = (lambda t: t[mask]) if ref[key].dim() >= 2 and ref[key].shape[:2] == mask.shape else (lambda t: t)
    torch.testing.assert_close(real(out[key]), real(ref[key]), atol=1e-4, rtol=1e-4)


def test_gpt2_causal_lm_forward_and_aliases():
    model = tiny_model("gpt2", "causal-lm")
    optimizer = TextModelOptimizer(no_compile())
    optimizer.optimize(model, task="text-generation")
    info = optimizer.get_optimization_info()
    assert info["task"] == "causal-lm" and info["verify"]["passed"]
    assert info["dtype"] == str(optimizer.dtype).replace("torch.", "")


def test_unknown_task_lists_the_valid_ones(tiny_bert):
    with pytest.raises(ValueError, match="fill-mask"):
        TextModelOptimizer(no_compile()).optimize(tiny_bert, task="summarization")


def test_callers_model_is_not_modified(tiny_bert):
    before, before_dtype = _state(tiny_bert), tiny_bert.dtype
    attn = tiny_bert.config._attn_implementation
    optimized = TextModelOptimizer(no_compile(dtype=torch.bfloat16)).optimize(tiny_bert)
    assert optimized is not tiny_bert and optimized.dtype == torch.bfloat16
    assert tiny_bert.dtype == before_dtype and tiny_bert.config._attn_implementation == attn
    for k, v in tiny_bert.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert tiny_bert.forward.__func__ is type(tiny_bert).forward  # no autocast wrapper leaked


def test_inplace_modifies_the_given_model(tiny_bert):
    optimized = TextModelOptimizer(no_compile(dtype=torch.bfloat16)).optimize(tiny_bert, inplace=True)
    assert optimized is tiny_bert and tiny_bert.dtype == torch.bfloat16


def test_dtype_and_amp_are_read_back(tiny_bert):
    opt = TextModelOptimizer(no_compile(dtype=torch.bfloat16, use_amp=True))
    model = opt.optimize(tiny_bert)
    info = opt.get_optimization_info()
    assert model.dtype == torch.bfloat16 and info["dtype"] == "bfloat16"
    assert info["amp_dtype"] == "bfloat16" and info["fp32_norm_layers"] == 5
    no_amp = TextModelOptimizer(no_compile(dtype=torch.bfloat16, use_amp=False))
    no_amp.optimize(tiny_bert)
    assert no_amp.get_optimization_info()["amp_dtype"] is None
    assert no_amp.get_optimization_info()["fp32_norm_layers"] == 0


def test_use_amp_changes_the_numbers(tiny_bert):
    batch = padded_batch(tiny_bert.config, 3, 16)
    outs = []
    for amp in (True, False):
        model = TextModelOptimizer(no_compile(dtype=torch.bfloat16, use_amp=amp)).optimize(tiny_bert)
        with torch.no_grad():
            outs.append(model(**batch).logits.float())
    with torch.no_grad():
        ref = tiny_bert(**batch).logits
    assert not torch.equal(outs[0], outs[1])
    # autocast keeps the layer norms and softmax in fp32: closer to the fp32 reference
    assert (outs[0] - ref).abs().max() <= (outs[1] - ref).abs().max() * 1.5


def test_eager_attention_when_asked(tiny_bert):
    opt = TextModelOptimizer(no_compile(enable_memory_efficient_attention=False))
    model = opt.optimize(tiny_bert)
    info = opt.get_optimization_info()
    assert model.config._attn_implementation == "eager"
    assert not info["efficient_attention"] and info["attention_implementation"] == "eager"


def test_gradient_checkpointing_reported_as_training_only(tiny_bert):
    opt = TextModelOptimizer(no_compile(gradient_checkpointing=True))
    model = opt.optimize(tiny_bert)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    info = opt.get_optimization_info()
    assert info["gradient_checkpointing"]
    assert any("training only" in s["detail"] for s in info["steps"] if s["applied"])


def test_verify_catches_a_broken_attention_mask(tiny_bert, monkeypatch):
    from torchbridge.pipeline import steps

    def break_mask(model, plan, report):
        inner = model.forward

        def forward(*args, attention_mask=None, **kwargs):
            return inner(*args, attention_mask=torch.ones_like(attention_mask), **kwargs)

        model.forward = forward
        return model

    # a planted bug in one step: the padded positions become visible to attention
    monkeypatch.setitem(steps.STEPS, "trim_padding", break_mask)
    with pytest.raises(VerificationError, match="min cosine"):
        TextModelOptimizer(no_compile(dtype=torch.float32)).optimize(tiny_bert)


def test_auto_precision_falls_back_to_fp32_when_verify_fails(tiny_bert, monkeypatch):
    from torchbridge.pipeline import steps

    original_cast = steps.cast_model

    def lossy_cast(model, dtype, **kwargs):  # a planted bug: half precision ruins a weight
        model = original_cast(model, dtype, **kwargs)
        if dtype != torch.float32:
            model.classifier.weight.data.mul_(-1)
        return model

    monkeypatch.setattr(steps, "cast_model", lossy_cast)
    opt = TextModelOptimizer(no_compile())  # dtype auto
    auto = opt.dtype
    if auto == torch.float32:
        pytest.skip("auto precision is already fp32 on this machine")
    model = opt.optimize(tiny_bert)
    info = opt.get_optimization_info()
    assert model.dtype == torch.float32 and info["dtype"] == "float32"
    assert info["verify"]["passed"] and any("fallback" in n for n in info["notes"])
    with pytest.raises(VerificationError):  # an explicit precision does not fall back
        TextModelOptimizer(no_compile(dtype=auto)).optimize(tiny_bert)


def test_verify_can_be_switched_off(tiny_bert):
    opt = TextModelOptimizer(no_compile(verify=False))
    opt.optimize(tiny_bert)
    assert opt.get_optimization_info()["verify"] is None


def test_verify_tolerance_is_used(tiny_bert):
    opt = TextModelOptimizer(no_compile(dtype=torch.bfloat16, verify_tolerance=1e-9))
    with pytest.raises(VerificationError, match="min_cosine 1.00000"):
        opt.optimize(tiny_bert)


def test_warmup_runs_the_configured_steps_and_shape(tiny_bert, monkeypatch):
    seen = []
    opt = TextModelOptimizer(no_compile(warmup_steps=4, warmup_batch_size=3, warmup_seq_len=20))
    model = opt.optimize(copy.deepcopy(tiny_bert))
    hook = model.bert.embeddings.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    hook.remove()
    # re-run the warm-up alone on the optimized model, recording the shapes it sends
    model.bert.embeddings.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[:2])))
    from torchbridge.families import FAMILIES
    from torchbridge.pipeline.warmup import warm_up

    warm_up(model, FAMILIES["bert"], opt.report, None)
    assert seen == [(3, 20)] * 4
    assert opt.get_optimization_info()["warmup"] == {"steps": 4, "shape": [3, 20]}


def test_zero_warmup_steps(tiny_bert):
    opt = TextModelOptimizer(no_compile(warmup_steps=0))
    opt.optimize(tiny_bert)
    assert "warmup_s" not in opt.get_optimization_info()["timings"]


def test_profiling_summary(tiny_bert):
    opt = TextModelOptimizer(no_compile(enable_profiling=True, warmup_steps=2))
    opt.optimize(tiny_bert)
    assert "addmm" in opt.report.profile_table or "linear" in opt.report.profile_table
    ops = opt.get_optimization_info()["profile_top_ops"]
    assert ops and all(op["calls"] >= 1 for op in ops)
    plain = TextModelOptimizer(no_compile())
    plain.optimize(tiny_bert)
    assert plain.report.profile_table is None


def test_info_before_optimize_is_the_plan():
    info = TextModelOptimizer().get_optimization_info()
    assert {"device", "dtype", "backend", "optimization_mode", "torch_compile", "compile_mode",
            "efficient_attention"} <= set(info)
    assert info["optimized"] is False and info["dtype_reason"] and info["compile_reason"]


def test_missing_model_names_three_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotAvailableError) as err:
        TextModelOptimizer(no_compile()).optimize("someone/not-cached-model", task="masked-lm")
    message = str(err.value)
    assert "local folder" in message and "cache" in message and "random weights" in message


def test_random_weights_are_explicit_and_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError):
        TextModelOptimizer(no_compile()).optimize("distilbert-base-uncased")
    opt = TextModelOptimizer(no_compile(random_weights=True, dtype=torch.float32))
    model = opt.optimize("distilbert-base-uncased", task="sequence-classification", num_labels=4)
    assert model.config.dim == 768 and model.config.num_labels == 4
    info = opt.get_optimization_info()
    assert info["random_weights"] and "RANDOM WEIGHTS" in opt.report.summary()


def test_local_folder_loads(tiny_bert_dir):
    opt = TextModelOptimizer(no_compile())
    model = opt.optimize(str(tiny_bert_dir), task="text-classification")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert opt.get_optimization_info()["verify"]["passed"]
    # no task: inferred from the checkpoint's architectures
    opt.optimize(str(tiny_bert_dir))
    assert opt.report.task == "sequence-classification"


def test_unknown_architecture_runs_generic_steps_and_says_so():
    model = tiny_model("electra", "sequence-classification", embedding_size=32)
    opt = TextModelOptimizer(no_compile(dtype=torch.float32))
    opt.optimize(model)
    assert any("not a known family" in n for n in opt.get_optimization_info()["notes"])


def test_default_bf16_is_the_plain_cast_and_says_why(tiny_bert):
    opt = TextModelOptimizer(no_compile(dtype=torch.bfloat16))
    opt.optimize(tiny_bert)
    info = opt.get_optimization_info()
    assert info["amp_dtype"] is None and "use_amp default" in info["amp_reason"]
    assert info["fp32_norm_layers"] == 0
