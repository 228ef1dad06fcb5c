"""The compiled path: one tiny model, compiled once, reused (compile is slow on 2 cores)."""

import pytest
import torch
from conftest import tiny_model

from torchbridge.models.text import TextModelConfig, TextModelOptimizer
from torchbridge.pipeline.verify import padded_batch


@pytest.fixture(scope="module")
def compiled():
    model = tiny_model("bert", "sequence-classification", num_labels=3)
    opt = TextModelOptimizer(TextModelConfig(dtype=torch.float32, use_torch_compile=True,
                                             warmup_steps=1, warmup_seq_len=24))
    return model, opt.optimize(model), opt


def test_compiled_model_is_reported_and_matches(compiled):
    reference, model, opt = compiled
    info = opt.get_optimization_info()
    assert info["torch_compile"] and info["compile_mode"] == "reduce-overhead"
    assert info["compile_options"] == {"options": {"freezing": True}}
    assert info["compiled_graphs"] >= 1 and info["timings"]["compile_s"] > 0
    assert info["verify"]["passed"]
    assert type(model).__name__ == "BertForSequenceClassification"  # still the HF class
    batch = padded_batch(reference.config, 3, 19)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits,
                                   atol=1e-4, rtol=1e-4)


def test_no_recompile_per_sequence_length(compiled):
    from torch._dynamo.utils import counters

    _, model, _ = compiled
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for length in range(5, 60, 3):
            for batch in (1, 2, 5):
                model(**padded_batch(model.config, batch, length, seed=length))
    # the first call compiled for dynamic batch and length; the warm-up added batch 1
    assert counters["stats"]["unique_graphs"] - before == 0


def test_compile_off_really_skips_it():
    model = tiny_model("bert", "sequence-classification")
    opt = TextModelOptimizer(TextModelConfig(use_torch_compile=False, warmup_steps=1))
    optimized = opt.optimize(model)
    from torchbridge.pipeline.optimizer import is_compiled

    assert not is_compiled(optimized)
    assert opt.get_optimization_info()["torch_compile"] is False
    assert opt.get_optimization_info()["compiled_graphs"] == 0


def test_failed_auto_compile_is_not_reported_as_compiled(monkeypatch):
    from torchbridge.pipeline import steps
    from torchbridge.pipeline.optimizer import CompileError

    def broken_compile(model, plan, report):
        model.forward = torch.compile(model.forward, backend=_failing_backend)
        report.step("torch.compile", True, "planted failing backend")
        return model

    monkeypatch.setitem(steps.STEPS, "compile", broken_compile)
    # a plain module: the mode preset compiles it (auto), so a failure falls back to eager
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(3, 8)
    opt = TextModelOptimizer(TextModelConfig(dtype=torch.float32, warmup_steps=1))
    optimized = opt.optimize(model, example_inputs=x)
    info = opt.get_optimization_info()
    assert info["torch_compile"] is False and any("compile failed" in n for n in info["notes"])
    torch.testing.assert_close(optimized(x), model(x))
    with pytest.raises(CompileError, match="use_torch_compile=False"):
        TextModelOptimizer(TextModelConfig(use_torch_compile=True, warmup_steps=1)).optimize(
            model, example_inputs=x)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("planted compiler failure")


def test_data_path_reuses_the_graph_of_the_first_call(tiny_bert_dir):
    """The gate batch carries every input the tokenizer makes (token_type_ids too), so the texts
    of `predict` (which passes them) run on the graph compiled at optimize time."""
    from torch._dynamo.utils import counters

    from torchbridge.models.text import create_optimized_text_model

    model = create_optimized_text_model(
        str(tiny_bert_dir), config=TextModelConfig(dtype=torch.float32, use_torch_compile=True,
                                                   warmup_steps=1))
    before = counters["stats"]["unique_graphs"]
    texts = ["this movie is great", "bad", "i didn't like it at all " * 5, "the film was fun"]
    for size in (1, 3, 4):
        assert len(model.predict(texts[:size] * 5)) == size * 5
    assert counters["stats"]["unique_graphs"] - before == 0
