"""Peers that run outside torch: ONNX Runtime (fp32 and int8), OpenVINO and CTranslate2, each
converted from the benchmark's reference weights and used the way its docs say (see peers.py)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backend import Backend, PeerUnavailable, Workload, _threads, need

# --- ONNX Runtime ----------------------------------------------------------------------------


class _WithPast(nn.Module):
    """GPT-style LM with the KV cache as flat tensors in and out, so it exports to one graph.

    Past length is never 0: the prefill feeds one dummy past slot that the attention mask hides,
    which keeps every dynamic dimension >= 1 (0-length dims break both exporters).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True)
        present = []
        for i in range(self.layers):
            present += [cache.layers[i].keys, cache.layers[i].values]
        return (out.logits, *present)


class _FirstOutput(nn.Module):
    """(input_ids, attention_mask) -> the first output (logits or last hidden state): positional
    inputs, because the TorchScript exporter maps keyword inputs onto forward's positions."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]


def _past_names(layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def export_onnx(wl: Workload) -> Path:
    """Export the reference with the TorchScript-based exporter: ORT's transformer optimizer
    (graph fusion, its documented next step) recognises the patterns this exporter emits."""
    path = wl.workdir / "model.onnx"
    if path.exists():
        return path
    model = wl.model.cpu()
    with warnings.catch_warnings():  # the tracer's advice is about models we do not trace
        warnings.simplefilter("ignore")
        _export(model, wl.generation, path)
    return path


def _export(model: nn.Module, generation: bool, path: Path) -> None:
    if generation:
        cfg = model.config
        layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads
        ids = torch.ones(1, 4, dtype=torch.long)
        past = [torch.zeros(1, heads, 1, head_dim) for _ in range(2 * layers)]
        mask = torch.ones(1, 5, dtype=torch.long)
        pos = torch.arange(4)[None]
        ins, outs = _past_names(layers, "past"), _past_names(layers, "present")
        axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "t"},
                "position_ids": {0: "b", 1: "s"}, "logits": {0: "b", 1: "s"}}
        axes.update({n: {0: "b", 2: "p"} for n in ins})
        axes.update({n: {0: "b", 2: "t"} for n in outs})
        torch.onnx.export(_WithPast(model).eval(), (ids, mask, pos, *past), str(path),
                          input_names=["input_ids", "attention_mask", "position_ids", *ins],
                          output_names=["logits", *outs], dynamic_axes=axes, dynamo=False,
                          opset_version=17)
    else:
        ids = torch.ones(2, 8, dtype=torch.long)
        names = ["input_ids", "attention_mask"]
        torch.onnx.export(_FirstOutput(model).eval(), (ids, ids), str(path), input_names=names,
                          output_names=["output"], dynamic_axes={n: {0: "b", 1: "s"} for n in names},
                          dynamo=False, opset_version=17)


def _ort_optimized(wl: Workload) -> Path:
    """export -> onnxruntime.transformers.optimizer (fused attention / layer norm / GELU)."""
    path = wl.workdir / "model.opt.onnx"
    if path.exists():
        return path
    from onnxruntime.transformers import optimizer

    cfg = wl.model.config
    model_type = "gpt2" if wl.generation else cfg.model_type
    if model_type not in ("bert", "gpt2", "distilbert", "roberta"):
        model_type = "bert"  # the generic encoder fusions
    opt = optimizer.optimize_model(str(export_onnx(wl)), model_type=model_type,
                                   num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size)
    opt.save_model_to_file(str(path))
    return path


def _ort_quantized(wl: Workload) -> Path:
    """ORT's documented dynamic int8 recipe: quantize_dynamic with QInt8 weights."""
    path = wl.workdir / "model.int8.onnx"
    if not path.exists():
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Fused contrib ops hide output types from ONNX shape inference; ORT's error message
        # names this option as the fix (their default type is float).
        quantize_dynamic(str(_ort_optimized(wl)), str(path), weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return path


def _session_runner(wl: Workload, run_one: Callable[[dict], list], dtype: str,
                    weights: Path, notes: str) -> Backend:
    if wl.generation:
        layers = wl.model.config.num_hidden_layers
        cfg = wl.model.config
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads
        names = _past_names(layers, "past")

        def step(feeds: dict) -> list:
            return run_one(feeds)

        def run(native: dict) -> Any:
            return _greedy_loop(step, native, names, heads, head_dim, wl.new_tokens)

        def feed(b: dict) -> dict:
            return {k: v.cpu().numpy() for k, v in b.items()}

        return Backend(dtype, feed, run, lambda out: torch.as_tensor(out),
                       weight_bytes=weights.stat().st_size, notes=notes)

    def feed_enc(b: dict) -> dict:
        return {k: v.cpu().numpy() for k, v in b.items()}

    return Backend(dtype, feed_enc, lambda native: run_one(native)[0],
                   lambda out: torch.as_tensor(out).float(), weight_bytes=weights.stat().st_size,
                   notes=notes)


def _greedy_loop(step: Callable[[dict], list], native: dict, names: list[str], heads: int,
                 head_dim: int, new_tokens: int):
    """Greedy decoding on an exported graph with a KV cache (what optimum does for these
    runtimes): prefill the prompt once, then one token per step, the cache fed back."""
    import numpy as np

    ids, mask = native["input_ids"], native["attention_mask"]
    batch = ids.shape[0]
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)  # left padding: count real tokens
    dummy = np.zeros((batch, 1), dtype=mask.dtype)  # the hidden past slot (see _WithPast)
    full_mask = np.concatenate([dummy, mask], axis=1)
    past = [np.zeros((batch, heads, 1, head_dim), dtype=np.float32)] * len(names)
    out = np.empty((batch, new_tokens), dtype=np.int64)
    feed_ids, feed_pos = ids, positions
    for t in range(new_tokens):
        res = step({"input_ids": feed_ids, "attention_mask": full_mask, "position_ids": feed_pos,
                    **dict(zip(names, past, strict=True))})
        nxt = res[0][:, -1].argmax(-1).astype(np.int64)[:, None]
        out[:, t] = nxt[:, 0]
        past = res[1:]
        full_mask = np.concatenate([full_mask, np.ones((batch, 1), dtype=mask.dtype)], axis=1)
        feed_pos = feed_pos[:, -1:] + 1
        feed_ids = nxt
    return out


def _ort_backend(wl: Workload, path: Path, dtype: str, notes: str) -> Backend:
    ort = need("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = _threads()  # the same thread budget as torch
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in sess.get_inputs()}

    def run_one(feeds: dict) -> list:
        return sess.run(None, {k: v for k, v in feeds.items() if k in wanted})

    return _session_runner(wl, run_one, dtype, path, notes)


def _cpu_only(wl: Workload, runtime: str) -> None:
    if wl.device.type != "cpu":
        raise PeerUnavailable(f"the {runtime} row runs on CPU only here; asked for {wl.device}")


def build_ort(wl: Workload) -> Backend:
    _cpu_only(wl, "ONNX Runtime")
    need("onnxruntime")
    need("onnx")
    return _ort_backend(wl, _ort_optimized(wl), "float32", "export + ORT transformer optimizer")


def build_ort_int8(wl: Workload) -> Backend:
    _cpu_only(wl, "ONNX Runtime")
    need("onnxruntime")
    need("onnx")
    return _ort_backend(wl, _ort_quantized(wl), "int8 dynamic", "optimizer + quantize_dynamic")


# --- OpenVINO ----------------------------------------------------------------------------------


def build_openvino(wl: Workload) -> Backend:
    """``openvino.convert_model`` on the torch model, compiled for CPU with default settings (its
    docs: the CPU plugin then picks bf16 where the CPU has it; the precision is read back)."""
    _cpu_only(wl, "OpenVINO")
    ov = need("openvino")
    model = wl.model.cpu()
    if wl.generation:
        # Tracing HF's DynamicCache fails in convert_model; OpenVINO reads the same KV-cache ONNX
        # graph the ORT row uses (optimum-intel, its own recipe, needs another transformers).
        need("onnx")
        src = export_onnx(wl)
        ov_model = ov.convert_model(str(src))
        notes = "converted from the KV-cache ONNX export"
    else:
        ex = torch.ones(2, 8, dtype=torch.long)
        ov_model = ov.convert_model(model, example_input={"input_ids": ex, "attention_mask": ex})
        src, notes = None, "convert_model(torch module)"
    compiled = ov.compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": _threads()})
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    dtype = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(precision, precision)
    request = compiled.create_infer_request()
    # a port can carry several tensor names (an ONNX input may also be named after the node that
    # consumes it): look each port up by the name the feed uses
    wanted = {"input_ids", "attention_mask", "position_ids", *_past_names(
        wl.model.config.num_hidden_layers, "past")}
    names = [next(iter(set(i.get_names()) & wanted), i.any_name) for i in compiled.inputs]

    def run_one(feeds: dict) -> list:
        return list(request.infer({n: feeds[n] for n in names}).to_tuple())

    if src is not None:
        return _session_runner(wl, run_one, dtype, src, notes)
    backend = _session_runner(wl, run_one, dtype, wl.workdir, notes)
    backend.weight_bytes = None  # not measured for a compiled OpenVINO module
    return backend


# --- CTranslate2 ---------------------------------------------------------------------------


def _ct2_source(wl: Workload) -> Path:
    """A folder the CTranslate2 converter accepts: the saved model plus a tokenizer.

    The converter copies the vocabulary out of a tokenizer; models with random weights have none,
    so a word-level tokenizer whose tokens are the ids themselves stands in (ids are what the
    harness feeds). transformers 5 dropped ``position_embedding_type`` from BertConfig, which the
    converter asserts on; the saved config restores its only value, "absolute".
    """
    src = wl.workdir / "ct2-src"
    if src.exists():
        return src
    shutil.copytree(wl.saved_dir(), src, copy_function=_link_or_copy)
    cfg_path = src / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") == "bert":
        cfg.setdefault("position_embedding_type", "absolute")
    cfg_path.unlink()  # a hard link to the saved model's config: never write through it
    cfg_path.write_text(json.dumps(cfg))
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(wl.model.config.vocab_size)}
    special = f"<{wl.model.config.eos_token_id or 0}>"
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, special)),
                                  unk_token=special, bos_token=special, eos_token=special)
    tok.save_pretrained(src)
    return src


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the weights are only read: a hard link saves a copy of ~0.5 GB
    except OSError:
        shutil.copy2(src, dst)


def _ct2_converted(wl: Workload) -> Path:
    out = wl.workdir / "ct2"
    if not out.exists():
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(str(_ct2_source(wl))).convert(str(out), force=True)
    return out


def _build_ct2(wl: Workload, compute_type: str) -> Backend:
    c2 = need("ctranslate2")
    device = "cuda" if wl.device.type == "cuda" else "cpu"
    if wl.device.type not in ("cpu", "cuda"):
        raise PeerUnavailable(f"CTranslate2 runs on cpu or cuda; asked for {wl.device}")
    path = _ct2_converted(wl)
    weights = path / "model.bin"
    threads = {"intra_threads": _threads()} if device == "cpu" else {}
    if wl.generation:
        gen = c2.Generator(str(path), device=device, compute_type=compute_type, **threads)

        def feed(b: dict) -> list[list[str]]:
            # ids -> the stand-in tokens, dropping padding (CTranslate2 batches ragged prompts)
            rows = zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), strict=True)
            return [[f"<{i}>" for i, m in zip(row, mrow, strict=True) if m] for row, mrow in rows]

        def run(prompts: list[list[str]]) -> Any:
            return gen.generate_batch(prompts, max_length=wl.new_tokens,
                                      min_length=wl.new_tokens, sampling_topk=1,
                                      include_prompt_in_result=False)

        def result(out: Any) -> torch.Tensor:
            return torch.tensor([r.sequences_ids[0] for r in out])

        return Backend(compute_type, feed, run, result, weights.stat().st_size,
                       "transformers converter")

    if wl.task not in ("sequence-classification", "feature-extraction"):
        raise PeerUnavailable(f"CTranslate2 encoders return hidden states only; task {wl.task} "
                              "has no head to apply")
    enc = c2.Encoder(str(path), device=device, compute_type=compute_type, **threads)
    head = wl.model.classifier if wl.task == "sequence-classification" else None

    def feed_enc(b: dict) -> list[list[int]]:
        lengths = b["attention_mask"].sum(1).tolist()  # padding dropped, the runtime's strength
        return [row[:n] for row, n in zip(b["input_ids"].tolist(), lengths, strict=True)]

    def run_enc(ids: list[list[int]]) -> Any:
        out = enc.forward_batch(ids)
        if head is None:
            return out.last_hidden_state
        import numpy as np

        with torch.inference_mode():  # the classifier head, applied to the pooled output
            return head(torch.as_tensor(np.asarray(out.pooler_output)))

    def result_enc(out: Any) -> torch.Tensor:
        import numpy as np

        return out.float() if torch.is_tensor(out) else torch.as_tensor(np.asarray(out)).float()

    return Backend(compute_type, feed_enc, run_enc, result_enc, weights.stat().st_size,
                   "transformers converter; padding dropped")


def build_ct2(wl: Workload) -> Backend:
    return _build_ct2(wl, "float32")


def build_ct2_int8(wl: Workload) -> Backend:
    return _build_ct2(wl, "int8")
