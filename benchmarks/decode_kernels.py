"""Which CPU kernel streams a decoder's weights fastest at batch 1 (the next int8 decoding lever).

A batch-1 decode step reads every weight once, so its floor is bytes / read bandwidth. This
script times one "token" of GPT-2's projections (12 x [c_attn, attn_proj, c_fc, mlp_proj] + the
50257 x 768 LM head, 124M weights, more than the last-level cache) through each candidate
kernel, median of ``--runs`` after warm-up, and reports ms per token and GB/s of weights read:

* bf16 ``F.linear`` (oneDNN, weight reordered per call) and bf16 packed once (one-row layout);
* the decoder's own batch-1 projection, a broadcast-multiply-sum that inductor compiles into one
  reduction (bf16 and int8 weights; the int8 scales are left out here);
* int8 weights, bf16 activations: ``aten._weight_int8pack_mm``;
* int8 weights and int8 activations: ``torch._int_mm`` at M = 1, and oneDNN's
  ``onednn.qlinear_pointwise`` with prepacked weights (the activation quantized per tensor,
  which at one row is per token);
* the memory read rate itself (a sum over 256 MB of fp32, bench/ceiling.py).

Kernels only: the decode step's other work (norms, attention, the compiled graph's dispatch)
comes on top. Writes JSON:

    python benchmarks/decode_kernels.py --output bench-results/decode_kernels.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from torchbridge.backends import describe, detect
from torchbridge.bench.ceiling import read_gb_per_s
from torchbridge.bench.harness import time_callable

LAYER = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]  # GPT-2 (out, in)
SHAPES = LAYER * 12 + [(50257, 768)]


def median_ms(fn: Callable[[], object], runs: int) -> float:
    return time_callable(fn, runs=runs, warmup=2).median_s * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--output", type=Path, default=Path("bench-results/decode_kernels.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(o, i) * 0.02 for o, i in SHAPES]
    n = sum(o * i for o, i in SHAPES)
    x = {i: torch.randn(1, i) for i in (768, 3072)}
    xb = {i: v.bfloat16() for i, v in x.items()}
    rows = {}

    def record(name: str, ms: float, nbytes: float) -> None:
        rows[name] = {"ms_per_token": round(ms, 2), "gb_per_s": round(nbytes / ms / 1e6, 1)}
        print(f"{name:>40}: {ms:6.2f} ms/token  {nbytes / ms / 1e6:5.1f} GB/s", flush=True)

    with torch.inference_mode():
        read = read_gb_per_s(torch.device("cpu"), runs=args.runs)
        rows["memory reads (bench/ceiling.py)"] = {"gb_per_s": read}
        print(f"{'memory reads (bench/ceiling.py)':>40}: {read:5.1f} GB/s", flush=True)
        plain = [w.bfloat16() for w in weights]
        record("bf16 F.linear", median_ms(
            lambda: [F.linear(xb[w.shape[1]], w) for w in plain], args.runs), 2 * n)
        # the decoder's own batch-1 projection (generation/decoders.py): inductor's reduction
        gemv = torch.compile(lambda x, ws: [(x[w.shape[1]].unsqueeze(-2) * w.float()).sum(-1)
                                            for w in ws])
        record("bf16 inductor reduction (the decoder's)", median_ms(
            lambda: gemv(x, plain), args.runs), 2 * n)
        if torch.backends.mkldnn.is_available():
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in plain]
            record("bf16 oneDNN packed (one-row layout)", median_ms(
                lambda: [torch.ops.mkldnn._linear_pointwise(xb[w.shape[1]], p, None, "none", [],
                                                            "")
                         for w, p in zip(plain, packed, strict=True)], args.runs), 2 * n)
        scales = [w.abs().amax(1) / 127 for w in weights]
        q = [torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
             for w, s in zip(weights, scales, strict=True)]
        sb = [s.bfloat16() for s in scales]
        record("int8 inductor reduction (the decoder's)", median_ms(
            lambda: gemv(x, q), args.runs), n)
        record("int8 weights, bf16 x: _weight_int8pack_mm", median_ms(
            lambda: [torch.ops.aten._weight_int8pack_mm(xb[w.shape[1]], w, s)
                     for w, s in zip(q, sb, strict=True)], args.runs), n)
        x8 = {i: torch.round(v / (v.abs().amax() / 127)).to(torch.int8) for i, v in x.items()}
        record("int8 weights, int8 x: _int_mm", median_ms(
            lambda: [torch._int_mm(x8[w.shape[1]], w.t()) for w in q], args.runs), n)
        if torch.backends.mkldnn.is_available():
            pq = [torch.ops.onednn.qlinear_prepack(w, [1, w.shape[1]]) for w in q]
            zeros = [torch.zeros(w.shape[0], dtype=torch.int32) for w in q]
            xu = {}
            for i, v in x.items():
                lo, hi = float(v.min()), float(v.max())
                s = (hi - lo) / 255
                zp = round(-lo / s)
                xu[i] = (torch.clamp(torch.round(v / s) + zp, 0, 255).to(torch.uint8), s, zp)
            record("int8 weights, uint8 x: oneDNN qlinear", median_ms(
                lambda: [torch.ops.onednn.qlinear_pointwise(
                    *xu[w.shape[1]], p, s, z, None, 1.0, 0, torch.float32, "none", [], "")
                    for w, p, s, z in zip(q, pq, scales, zeros, strict=True)], args.runs), n)
    result = {"device": describe(detect("cpu")), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "weights": n, "kernels": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
