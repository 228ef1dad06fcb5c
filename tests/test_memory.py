import pytest

from torchbridge.models.text.memory import estimate_memory, memory_table


@pytest.mark.parametrize("name, millions", [
    ("bert-base-uncased", 109.5), ("bert-large-uncased", 335.1), ("distilbert-base-uncased", 66.4),
    ("gpt2", 124.4), ("gpt2-medium", 354.8),
])
def test_parameter_counts_match_the_published_models(name, millions):
    row = estimate_memory(name)
    assert row["parameters"] / 1e6 == pytest.approx(millions, abs=0.1)
    assert row["fp32_mib"] == pytest.approx(2 * row["bf16_mib"], abs=0.2)
    assert row["fp16_mib"] == row["bf16_mib"]
    assert row["int8-weight-only_mib"] == pytest.approx(row["fp32_mib"] / 4, abs=0.2)
    assert row["int8-dynamic_mib"] == row["fp8-weight-only_mib"] == row["int8-weight-only_mib"]


def test_table_and_local_folder(tiny_bert_dir):
    assert "| gpt2-medium | 354.8M |" in memory_table()
    row = estimate_memory(str(tiny_bert_dir), random_weights=False)
    assert row["model_type"] == "bert" and row["parameters"] < 100_000
