"""Batch API over texts: encode, predict, generate_text (tiny local models, compile off)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tests.conftest import tiny_model
from torchbridge.data import heads
from torchbridge.data.inference import encode, generate_text, predict
from torchbridge.data.texts import DEFAULT_BATCH_TOKENS, plan_batches
from torchbridge.models.text import create_optimized_text_model
from torchbridge.pipeline.padding import LENGTH_BUCKET, bucketed, row_counts

FAST = dict(use_torch_compile=False, warmup_steps=1, warmup_seq_len=16, verify=False,
            dtype=torch.float32)
TEXTS = ["the movie is great", "i didn't like it at all", "bad", "this film was not very fun and "
         "the john of google in new york was boring", "good good", "a"]


def _folder(tmp_path_factory, tiny_bert_dir, name, model):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def embedder(tmp_path_factory, tiny_bert_dir):
    path = _folder(tmp_path_factory, tiny_bert_dir, "tiny-embedder",
                   tiny_model("bert", "feature-extraction"))
    return create_optimized_text_model(path, task="feature-extraction", **FAST)


@pytest.fixture(scope="module")
def reference_embeddings(embedder):
    """Mean-pooled fp32 embeddings, one text at a time through the plain HF model."""
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(embedder.report.model_name).eval()
    out = []
    for text in TEXTS:
        batch = embedder.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            h = hf(**batch).last_hidden_state[0]
        out.append(h.mean(0).numpy())
    return np.stack(out)


def test_encode_matches_one_by_one_reference_in_input_order(embedder, reference_embeddings):
    got = encode(embedder, TEXTS, max_batch_tokens=24)  # several batches, lengths mixed
    assert got.shape == (len(TEXTS), 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_embeddings, atol=1e-4)
    assert embedder.pooling.mode == "mean" and "default" in embedder.pooling.source


def test_encode_outputs_normalize_and_wrapper_method(embedder):
    as_torch = embedder.encode(TEXTS, output="torch", normalize=True, batch_size=2)
    assert isinstance(as_torch, torch.Tensor)
    torch.testing.assert_close(as_torch.norm(dim=-1), torch.ones(len(TEXTS)))
    as_list = encode(embedder, TEXTS[:2], output="list")
    assert isinstance(as_list, list) and len(as_list[0]) == 32
    with pytest.raises(ValueError, match="output='pandas'"):
        encode(embedder, TEXTS, output="pandas")


def test_bad_rows_name_their_index(embedder):
    with pytest.raises(ValueError, match="text 1: empty string"):
        encode(embedder, ["fine", "  ", "ok"])
    with pytest.raises(ValueError, match=r"text 2: not a string \(got int\)"):
        encode(embedder, ["fine", "ok", 3])
    with pytest.raises(TypeError, match="single str"):
        encode(embedder, "one string")
    long = " ".join(["movie"] * 300)
    with pytest.raises(ValueError, match=r"text 1: 302 tokens, more than the model's limit of 128"):
        encode(embedder, ["ok", long], truncation=False)
    assert encode(embedder, ["ok", long]).shape == (2, 32)  # truncated to 128 by default


def test_sentence_transformers_pooling_config_is_followed(tmp_path, tiny_bert_dir):
    path = _folder_plain(tmp_path, tiny_bert_dir)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    model = create_optimized_text_model(path, task="feature-extraction", **FAST)
    got = encode(model, TEXTS[:3], output="torch")
    assert model.pooling.mode == "cls" and "1_Pooling" in model.pooling.source
    batch = model.tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        cls = model(**batch).last_hidden_state[0, 0].float()
    torch.testing.assert_close(got[0], cls, atol=1e-4, rtol=1e-4)


def _folder_plain(tmp_path, tiny_bert_dir):
    from transformers import AutoTokenizer

    tiny_model("bert", "feature-extraction").save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path)
    return tmp_path


def test_token_budget_batches_cover_every_row_once():
    lengths = [5, 30, 7, 12, 30, 1, 9, 9, 64]
    batches = plan_batches(lengths, max_batch_tokens=64)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 64
    assert [len(b) for b in plan_batches(lengths, batch_size=4)] == [4, 4, 1]
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        plan_batches(lengths, batch_size=0)


def test_bounded_batches_cover_every_row_once_in_few_shapes():
    """Right-padded batches (max_width given) take their row counts from a fixed set, so a long
    run over texts of every length meets few shapes; filler only repeats a batch's last row."""
    rng = random.Random(0)
    for budget, batch_size, counts in ((None, None, set(row_counts(256))),
                                       (512, None, set(row_counts(32))),
                                       (None, 20, {*row_counts(20), 20})):
        shapes = set()
        for _ in range(200):
            lengths = [rng.randint(1, 140) for _ in range(rng.randint(1, 300))]
            batches = plan_batches(lengths, batch_size=batch_size, max_batch_tokens=budget,
                                   max_width=128)
            real = [b[:len(set(b))] for b in batches]
            # each row once, longest first (the caller puts results back by index)
            flat = [i for b in real for i in b]
            assert sorted(flat) == list(range(len(lengths)))
            assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
            for b, rows in zip(batches, real, strict=True):
                assert b[len(rows):] == [rows[-1]] * (len(b) - len(rows))
                width = max(max(lengths[i] for i in b), bucketed(lengths[b[0]], 128))
                if budget or not batch_size:
                    assert len(b) * width <= (budget or DEFAULT_BATCH_TOKENS) or len(b) == 1
                shapes.add((len(b), width))
        assert {rows for rows, _ in shapes} <= counts
        widths = {w for _, w in shapes}
        assert all(w % LENGTH_BUCKET == 0 for w in widths if w <= 128)
        # rows over 128 tokens (truncation off) keep their own width: one shape per length
        assert len(shapes) <= len(counts) * len(widths)


def test_encode_meets_few_shapes_and_keeps_input_order(embedder):
    rng = random.Random(1)
    words = "the a movie is great bad good film not very fun".split()
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 140))) for _ in range(600)]
    shapes = set()
    hook = embedder.model.get_input_embeddings().register_forward_hook(
        lambda m, i, o: shapes.add(tuple(i[0].shape)))
    try:
        got, start = [], 0
        while start < len(texts):  # calls of random sizes, as a server's queue makes them
            n = rng.randint(1, 150)
            got.append(encode(embedder, texts[start:start + n]))
            start += n
    finally:
        hook.remove()
    assert all(rows in row_counts(rows) and width % LENGTH_BUCKET == 0 for rows, width in shapes)
    assert len(shapes) <= len(row_counts(256)) * 8  # row counts 1..256, widths 16..128
    one_by_one = np.stack([encode(embedder, [t])[0] for t in texts])
    np.testing.assert_allclose(np.concatenate(got), one_by_one, atol=1e-4)


def test_predict_sequence_classification(tiny_bert_dir):
    model = create_optimized_text_model(tiny_bert_dir, task="sequence-classification", **FAST)
    model.config.id2label = {0: "negative", 1: "positive"}
    got = predict(model, TEXTS, batch_size=2)
    assert [set(r) for r in got] == [{"label", "score", "scores"}] * len(TEXTS)
    for text, r in zip(TEXTS, got, strict=True):
        assert set(r["scores"]) == {"negative", "positive"}
        assert r["score"] == max(r["scores"].values())
        assert abs(sum(r["scores"].values()) - 1) < 1e-5
        assert r == predict(model, [text])[0] or abs(r["score"] - predict(model, [text])[0]["score"]) < 1e-5
    with pytest.raises(ValueError, match="use encode"):
        predict(create_optimized_text_model(tiny_bert_dir, task="feature-extraction", **FAST), ["x"])


def test_entities_aggregate_words_and_char_spans():
    config = type("C", (), {"id2label": {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}})
    text = "John Smithson works in New York"
    # tokens: [CLS] john smith ##son works in new york [SEP]
    offsets = [(0, 0), (0, 4), (5, 10), (10, 13), (14, 19), (20, 22), (23, 26), (27, 31), (0, 0)]
    words = [None, 0, 1, 1, 2, 3, 4, 5, None]
    tags = [0, 1, 2, 0, 0, 0, 3, 4, 0]  # '##son' says O: the word keeps its first token's label
    logits = torch.full((9, 5), -5.0)
    logits[torch.arange(9), torch.tensor(tags)] = 5.0
    found = heads.entities(logits, text, offsets, words, config)
    assert [(e["entity_group"], e["word"], e["start"], e["end"]) for e in found] == [
        ("PER", "John Smithson", 0, 13), ("LOC", "New York", 23, 31)]
    assert all(0 < e["score"] <= 1 for e in found)


def test_predict_token_classification_spans_point_into_text(tmp_path_factory, tiny_bert_dir):
    labels = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-ORG"}
    path = _folder(tmp_path_factory, tiny_bert_dir, "tiny-ner",
                   tiny_model("bert", "token-classification", num_labels=4, id2label=labels,
                              label2id={v: k for k, v in labels.items()}))
    model = create_optimized_text_model(path, task="token-classification", **FAST)
    got = model.predict(TEXTS)
    assert len(got) == len(TEXTS)
    for text, ents in zip(TEXTS, got, strict=True):
        for e in ents:
            assert e["word"] == text[e["start"]:e["end"]] and e["entity_group"] in ("PER", "ORG")


def test_predict_question_answering(tmp_path_factory, tiny_bert_dir):
    path = _folder(tmp_path_factory, tiny_bert_dir, "tiny-qa", tiny_model("bert", "question-answering"))
    model = create_optimized_text_model(path, task="question-answering", **FAST)
    pairs = [("who works", "john works at google in new york"),
             {"question": "what", "context": "the movie is great fun"}]
    got = predict(model, pairs)
    for (_, context), r in zip([pairs[0], ("", pairs[1]["context"])], got, strict=True):
        assert set(r) == {"answer", "score", "start", "end"}
        assert r["answer"] == context[r["start"]:r["end"]] and r["answer"]
    with pytest.raises(ValueError, match="text 1: expected a .question, context. pair"):
        predict(model, [pairs[0], ("only one",)])


def _word_tokenizer(tiny_bert_dir):
    """A GPT-2-like tokenizer (no [CLS]/[SEP] added) over the tiny vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate((tiny_bert_dir / "vocab.txt").read_text().split())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   eos_token="[SEP]", model_max_length=128)


def test_generate_text_batched_matches_one_by_one(tiny_bert_dir):
    model = create_optimized_text_model(tiny_model("gpt2", "causal-lm"), task="causal-lm", **FAST)
    with pytest.raises(ValueError, match=r"model.tokenizer = AutoTokenizer"):
        generate_text(model, ["the movie"])
    model.tokenizer = _word_tokenizer(tiny_bert_dir)
    prompts = ["the movie is", "bad", "john works at google in new york and"]
    batched = model.generate_text(prompts, max_new_tokens=5, batch_size=3, do_sample=False)
    single = [generate_text(model, [p], max_new_tokens=5, do_sample=False)[0] for p in prompts]
    assert batched == single and all(isinstance(t, str) and t for t in batched)
    with pytest.raises(ValueError, match="text 0: .* tokens, more than the model's limit of 8 "
                                         r"\(128 minus 120 new tokens\)"):
        generate_text(model, [" ".join(["the"] * 20)], max_new_tokens=120, truncation=False)


def test_sentence_transformers_max_seq_length_is_the_limit(tmp_path, tiny_bert_dir):
    from torchbridge.data.texts import max_tokens

    path = _folder_plain(tmp_path, tiny_bert_dir)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    model = create_optimized_text_model(path, task="feature-extraction", **FAST)
    assert max_tokens(model, model.tokenizer) == 16  # before any encode call too
    with pytest.raises(ValueError, match="limit of 16"):
        encode(model, [" ".join(["movie"] * 20)], truncation=False)
