import pytest
import torch
from conftest import no_compile, tiny_model

from torchbridge.models import OptimizedBERT as ReexportedBERT
from torchbridge.models.text import (
    OptimizedBERT,
    OptimizedDistilBERT,
    OptimizedGPT2,
    TextModelConfig,
    create_optimized_text_model,
)
from torchbridge.pipeline.verify import padded_batch


def test_models_package_reexports():
    assert ReexportedBERT is OptimizedBERT


def test_optimized_bert_from_a_local_folder_with_its_tokenizer(tiny_bert_dir):
    from transformers import AutoTokenizer

    model = OptimizedBERT(str(tiny_bert_dir), task="sequence-classification", num_labels=2,
                          config=no_compile())
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = ["this movie is great", "i didn't like this at all"]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.logits.shape == (2, 2)
    info = model.get_optimization_info()
    for key in ("device", "dtype", "backend", "optimization_mode", "torch_compile", "compile_mode",
                "efficient_attention"):
        assert key in info
    assert model.config.num_labels == 2 and model.device == torch.device("cpu")


def test_works_inside_a_transformers_pipeline(tiny_bert_dir):
    from transformers import AutoTokenizer, pipeline

    model = OptimizedBERT(str(tiny_bert_dir), config=no_compile())
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer)
    result = classify(["this movie is great", "boring"])
    assert len(result) == 2 and {"label", "score"} <= set(result[0])


def test_distilbert_and_num_labels():
    model = OptimizedDistilBERT(tiny_model("distilbert", "sequence-classification", num_labels=2),
                                config=no_compile())
    assert model.get_optimization_info()["model_type"] == "distilbert"
    with pytest.raises(ValueError, match="num_labels"):
        OptimizedDistilBERT(tiny_model("distilbert", "masked-lm"), task="fill-mask", num_labels=5,
                            config=no_compile())


def test_gpt2_wrapper_generates_like_hf():
    reference = tiny_model("gpt2", "causal-lm")
    model = OptimizedGPT2(reference, config=no_compile(dtype=torch.float32))
    ids = padded_batch(reference.config, 1, 6)["input_ids"]
    out = model.generate(ids, max_length=16, do_sample=False, pad_token_id=98)
    expected = reference.generate(ids, max_length=16, do_sample=False, pad_token_id=98)
    assert torch.equal(out, expected)


def test_factory_picks_the_wrapper_and_rejects_unknown_modes():
    model = create_optimized_text_model(tiny_model("bert", "sequence-classification", num_labels=3),
                                        optimization_mode="balanced", use_torch_compile=False,
                                        warmup_steps=1)
    assert isinstance(model, OptimizedBERT)
    assert model.get_optimization_info()["optimization_mode"] == "balanced"
    with pytest.raises(ValueError, match="throughput"):
        create_optimized_text_model(tiny_model(), optimization_mode="fastest")
    gpt = create_optimized_text_model(tiny_model("gpt2", "causal-lm"), config=no_compile())
    assert isinstance(gpt, OptimizedGPT2) and gpt.task == "causal-lm"


def test_factory_with_random_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    model = create_optimized_text_model("distilbert-base-uncased", task="text-classification",
                                        num_labels=3, random_weights=True, use_torch_compile=False,
                                        warmup_steps=0, dtype=torch.float32)
    assert isinstance(model, OptimizedDistilBERT) and model.config.num_labels == 3
    assert model.get_optimization_info()["random_weights"]


def test_config_object_and_fields_are_exclusive():
    with pytest.raises(ValueError, match="either"):
        create_optimized_text_model(tiny_model(), config=TextModelConfig(), warmup_steps=1)


def test_gpt2_generate_is_the_fast_path_verified_and_warmed_up():
    from torchbridge.pipeline.decoding import fast_generator

    reference = tiny_model("gpt2", "causal-lm")
    model = OptimizedGPT2(reference, config=TextModelConfig(dtype=torch.float32, warmup_seq_len=24,
                                                            warmup_steps=1))
    generator = fast_generator(model.model)
    assert generator is not None and generator.compile
    info = model.get_optimization_info()
    assert info["generation"]["verify"]["identical"]
    assert any(s["name"] == "fast_generate" and s["applied"] for s in info["steps"])
    compiles = generator.stats["compiles"]
    ids = padded_batch(reference.config, 1, 5)["input_ids"]
    out = model.generate(ids, max_length=20, do_sample=False, pad_token_id=98)
    expected = reference.generate(ids, max_length=20, do_sample=False, pad_token_id=98)
    assert torch.equal(out, expected)
    assert generator.stats["compiles"] == compiles  # the warm-up compiled this shape already
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, max_length=20, num_beams=4)


def test_generation_config_from_pipelines_is_translated_or_rejected():
    from transformers import GenerationConfig

    from torchbridge.pipeline.decoding import _generation_config_kwargs

    assert _generation_config_kwargs(GenerationConfig(max_new_tokens=5, top_k=3)) == {
        "max_new_tokens": 5, "top_k": 3}
    with pytest.raises(ValueError, match="num_beams"):
        _generation_config_kwargs(GenerationConfig(num_beams=3))
