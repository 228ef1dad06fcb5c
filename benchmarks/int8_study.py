"""Which levers make dynamic int8 fast on this CPU: the study behind Int8DynamicLinear.

Two parts, each in this one process, candidates interleaved round-robin (one call of each per
round) so that load from other processes hits them alike; speedups are medians of per-round
ratios, times are medians and p90s after warm-up, first calls (compile) reported apart.

* GEMM level, BERT-base shapes at 8 x 128 tokens: the int8 projection written several ways
  (activation scale per token or per tensor, weight [K, N] contiguous or a transposed view,
  three Q/K/V GEMMs or one fused, compiled with freezing or with max-autotune) against the bare
  ``torch._int_mm`` and the bf16 GEMM.
* Model level, BERT-base sequence classification (random weights: speed does not depend on them)
  at 8 x 128, full-length and padded (rows down to ~1/4), against HF eager fp32: torchbridge bf16,
  int8 with bf16 activations, int8 with fp32 activations (all SDPA, torch.compile with freezing,
  padding trimmed like the pipeline does), and the peers ONNX Runtime int8 and CTranslate2 int8
  when installed. GFLOP/s are given as a fraction of the int8 GEMM rate measured in the same run.

    python benchmarks/int8_study.py --output bench-results/int8_study.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchbridge.bench.environment import env_report
from torchbridge.bench.runner import count_flops, make_batch
from torchbridge.pipeline.loading import load_model
from torchbridge.pipeline.padding import wrap_trim_padding
from torchbridge.precisions.int8_dynamic import quantize_dynamic_int8
from torchbridge.precisions.int8_weight_only import quantize_per_channel

TASK = "sequence-classification"
GEMM_BASELINE = "per-token, [K,N] weight (compiled)"


def round_robin(calls: dict[str, Callable[[], Any]], rounds: int,
                warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per call of each candidate, one call of each per round; the
    order rotates every round, so no candidate always runs first (after another's cache traffic).

    CPU time is the steadier measure on a shared machine: time this process spent waiting for a
    core does not count (with several threads, spin-waiting at barriers still does)."""
    wall: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            call = calls[name]
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            if r >= warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return wall, cpu


def summarize(times: tuple[dict[str, list[float]], dict[str, list[float]]], baseline: str,
              flops: float | None = None) -> dict:
    wall, cpu = times
    out = {}
    for name, ts in wall.items():
        ratios = [b / t for b, t in zip(wall[baseline], ts, strict=True)]
        cpu_ratios = [b / t for b, t in zip(cpu[baseline], cpu[name], strict=True)]
        row = {"median_ms": statistics.median(ts) * 1e3,
               "p90_ms": statistics.quantiles(ts, n=10)[-1] * 1e3 if len(ts) > 1 else ts[0] * 1e3,
               f"speedup_vs_{baseline}": statistics.median(ratios),
               "cpu_median_ms": statistics.median(cpu[name]) * 1e3,
               f"cpu_time_speedup_vs_{baseline}": statistics.median(cpu_ratios)}
        if flops:
            row["gflops"] = flops / statistics.median(ts) / 1e9
        out[name] = row
    return out


# --- GEMM level --------------------------------------------------------------------------------


def _per_tensor(x: torch.Tensor, wt: torch.Tensor, ws: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x2 = x.float()
    s = x2.abs().amax().clamp(min=1e-8) / 127.0
    q = torch.round(x2 / s).clamp(-127, 127).to(torch.int8)
    return (torch._int_mm(q, wt).float() * (s * ws) + b).to(x.dtype)


def _per_token(x: torch.Tensor, wt: torch.Tensor, ws: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    x2 = x.float()
    s = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.round(x2 / s).clamp(-127, 127).to(torch.int8)
    return (torch._int_mm(q, wt).float() * s * ws + b).to(x.dtype)


def _onednn_qlinear(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor],
                    bias: list[torch.Tensor]) -> Callable[[], Any] | None:
    """oneDNN's int8 linear (what PT2E x86 quantization lowers to): rescale, bias and bf16 output
    fused into the GEMM, so no int32 [M, N] round trip; it takes one activation scale per tensor
    only ("act scale/zp size should be 1"), and its packed weight is an opaque mkldnn tensor."""
    op = getattr(getattr(torch.ops, "onednn", None), "qlinear_pointwise", None)
    if op is None:
        return None
    m, k = x.shape
    packed = [torch.ops.onednn.qlinear_prepack(w, [m, k]) for w in weights]
    zero = torch.zeros((), dtype=torch.int64)
    wzp = [torch.zeros(w.shape[0], dtype=torch.int64) for w in weights]

    def quantize(x):
        x2 = x.float()
        s = x2.abs().amax().clamp(min=1e-8) / 127.0
        return torch.round(x2 / s).clamp(-127, 127).to(torch.int8), s

    quantize = torch.compile(quantize)

    def run():
        q, s = quantize(x)
        return [op.tensor(q, s, zero, p, ws, zp, b, 1.0, 0, torch.bfloat16, "none", [], "")
                for p, ws, zp, b in zip(packed, scales, wzp, bias, strict=True)]
    return run


def gemm_study(rounds: int) -> dict:
    """The QKV projections of one BERT-base layer (3 x [1024, 768] @ [768, 768]), written each way."""
    torch.manual_seed(0)
    m, k, n = 1024, 768, 768
    x = torch.randn(m, k).bfloat16()
    ws = [torch.randn(n, k) * 0.02 for _ in range(3)]
    qs = [quantize_per_channel(w) for w in ws]
    bias = [torch.randn(n) * 0.02 for _ in range(3)]
    kn = [q.t().contiguous() for q, _ in qs]  # [K, N] contiguous
    nk_view = [q.t() for q, _ in qs]  # [N, K] storage, transposed view
    scales = [s for _, s in qs]
    fused_w = torch.cat([q for q, _ in qs]).t().contiguous()
    fused_s, fused_b = torch.cat(scales), torch.cat(bias)
    a8 = torch.randint(-127, 127, (m, k), dtype=torch.int8)
    wb = [w.bfloat16() for w in ws]
    bb = [b.bfloat16() for b in bias]

    def three(fn, weights):
        def run(x):
            return [fn(x, w, s, b) for w, s, b in zip(weights, scales, bias, strict=True)]
        return run

    def fused(x):
        return _per_token(x, fused_w, fused_s, fused_b).split(n, dim=-1)

    eager = {
        "int_mm only (no quantize)": lambda x: [torch._int_mm(a8, w) for w in kn],
        "bf16 F.linear": lambda x: [F.linear(x, w, b) for w, b in zip(wb, bb, strict=True)],
    }
    compiled_fns = {
        "per-token, [K,N] weight": three(_per_token, kn),
        "per-tensor, [K,N] weight": three(_per_tensor, kn),
        "per-token, [N,K] transposed view": three(_per_token, nk_view),
        "per-token, fused QKV GEMM": fused,
    }
    calls, compile_s = {}, {}
    for name, fn in compiled_fns.items():
        for tag, opts in (("compiled", {"freezing": True}),
                          ("max-autotune", {"freezing": True, "max_autotune": True})):
            if tag == "max-autotune" and name != "per-token, [K,N] weight":
                continue
            f = torch.compile(fn, options=opts)
            t0 = time.perf_counter()
            with torch.no_grad():
                f(x)
            compile_s[f"{name} ({tag})"] = time.perf_counter() - t0
            calls[f"{name} ({tag})"] = lambda f=f: f(x)
    calls["per-token, [K,N] weight (eager)"] = lambda: three(_per_token, kn)(x)
    onednn = _onednn_qlinear(x, [q for q, _ in qs], scales, bias)
    if onednn is not None:
        calls["per-tensor, oneDNN qlinear, rescale+bias fused, bf16 out"] = onednn
    calls.update({name: (lambda f=f: f(x)) for name, f in eager.items()})
    with torch.no_grad():
        times = round_robin(calls, rounds, warmup=3)
    rows = summarize(times, GEMM_BASELINE, flops=3 * 2.0 * m * k * n)
    for name, s in compile_s.items():
        rows[name]["first_call_s"] = s
    return {"shape_mkn_x3": [m, k, n], "rows": rows}


# --- model level -------------------------------------------------------------------------------


def _prepared(reference: nn.Module, dtype: torch.dtype, int8: bool) -> nn.Module:
    """What the pipeline builds: SDPA, cast, optional int8, compiled forward with freezing,
    padding trimmed outside the compiled graph."""
    import copy

    model = copy.deepcopy(reference)
    model.set_attn_implementation("sdpa")
    model = model.to(dtype)
    if int8:
        quantize_dynamic_int8(model)
    model.forward = torch.compile(model.forward, options={"freezing": True})
    return wrap_trim_padding(model, TASK)


def _peer(name: str, reference: nn.Module, workdir: Path):
    from torchbridge.bench.peers import PEERS, PeerUnavailable, Workload

    wl = Workload(model=reference, task=TASK, device=torch.device("cpu"), workdir=workdir)
    try:
        return PEERS[name][0](wl)
    except PeerUnavailable as err:
        print(f"{name}: skipped ({err})", file=sys.stderr)
        return None


def model_study(model_name: str, batch: int, seq: int, rounds: int, peers: list[str]) -> dict:
    reference = load_model(model_name, TASK, random_weights=True, attn_implementation="eager")
    reference = reference.float().eval()
    variants = {"full": make_batch(reference.config, batch, seq, padded=False, left_pad=False),
                "padded": make_batch(reference.config, batch, seq, padded=True, left_pad=False)}
    flops = count_flops(reference, variants["full"])
    # name -> (run(variant) -> raw output, raw output -> logits tensor)
    candidates: dict[str, tuple[Callable[[str], Any], Callable[[Any], torch.Tensor]]] = {}

    def torch_run(model):
        def run(variant):
            with torch.no_grad():
                return model(**variants[variant]).logits
        return run, lambda out: out

    candidates["hf-eager-fp32"] = torch_run(reference)
    for name, dtype, int8 in (("torchbridge bf16", torch.bfloat16, False),
                              ("torchbridge int8 (bf16 activations)", torch.bfloat16, True),
                              ("torchbridge int8 (fp32 activations)", torch.float32, True)):
        candidates[name] = torch_run(_prepared(reference, dtype, int8))
    tmp = tempfile.TemporaryDirectory(prefix="int8-study-")
    for peer in peers:
        backend = _peer(peer, reference, Path(tmp.name))
        if backend is not None:
            native = {v: backend.feed(b) for v, b in variants.items()}
            candidates[peer] = (lambda v, be=backend, nat=native: be.run(nat[v]), backend.result)

    result: dict[str, Any] = {"flops_full": flops, "variants": {}}
    for variant, b in variants.items():
        outputs, first_call = {}, {}
        for name, (run, to_tensor) in candidates.items():
            t0 = time.perf_counter()
            outputs[name] = to_tensor(run(variant)).float()
            # compile happens here for the first variant; the padded one adds trimmed shapes
            first_call[name] = time.perf_counter() - t0
            run(variant)  # shape-settling: dynamo marks sizes dynamic on a second shape
        calls = {name: (lambda run=run, v=variant: run(v)) for name, (run, _) in candidates.items()}
        times = round_robin(calls, rounds, warmup=2)
        rows = summarize(times, "hf-eager-fp32", flops=flops if variant == "full" else None)
        ref = outputs["hf-eager-fp32"]
        for name, out in outputs.items():
            cos = F.cosine_similarity(out.double(), ref.double(), dim=-1)
            rows[name].update(min_cosine_vs_fp32=float(cos.min()),
                              argmax_agreement=float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
                              first_call_s=first_call[name])
        result["variants"][variant] = {
            "real_token_fraction": float(b["attention_mask"].float().mean()), "rows": rows}
    tmp.cleanup()
    return result


def int8_gemm_rate(runs: int) -> float:
    sys.path.insert(0, str(Path(__file__).parent))
    from gemm_ceiling import measure  # the same measurement as benchmarks/gemm_ceiling.py

    return measure(torch.device("cpu"), runs)["int8"]


def _env() -> dict:
    try:
        return env_report("cpu")
    except ImportError as err:  # the library mid-refactor: record the essentials ourselves
        import platform

        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__,
                "cpu": platform.processor() or platform.machine(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "env_report_error": str(err)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert-base-uncased")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (peers use the same)")
    parser.add_argument("--peers", default="ort-int8,ct2-int8")
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--output", type=Path, default=Path("bench-results/int8_study.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"env": _env(), "threads": torch.get_num_threads(),
                              "timing": "round-robin, medians of per-round ratios"}
    if not args.skip_gemm:
        result["gemm"] = gemm_study(args.rounds * 2)
        base = GEMM_BASELINE
        for name, row in result["gemm"]["rows"].items():
            print(f"{name:>48}: {row['median_ms']:7.2f} ms  cpu {row['cpu_median_ms']:7.2f} ms  "
                  f"{row['gflops']:6.0f} GFLOP/s  x{row['cpu_time_speedup_vs_' + base]:.2f}")
    if args.skip_model:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
        return
    peers = [p for p in args.peers.split(",") if p]
    result["model"] = model_study(args.model, args.batch_size, args.seq_len, args.rounds, peers)
    rate = int8_gemm_rate(10)
    result["int8_gemm_gflops"] = rate
    for row in result["model"]["variants"]["full"]["rows"].values():
        row["fraction_of_int8_gemm_rate"] = row["gflops"] / rate
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    for variant, v in result["model"]["variants"].items():
        print(f"-- {variant} ({v['real_token_fraction']:.0%} real tokens)")
        for name, row in v["rows"].items():
            extra = f"  {row['gflops']:.0f} GFLOP/s" if "gflops" in row else ""
            print(f"{name:>40}: {row['median_ms']:8.1f} ms  {row['speedup_vs_hf-eager-fp32']:5.2f}x"
                  f"  cpu {row['cpu_median_ms']:8.1f} ms {row['cpu_time_speedup_vs_hf-eager-fp32']:5.2f}x"
                  f"  cos {row['min_cosine_vs_fp32']:.4f}{extra}")
    print(f"int8 GEMM rate (gemm_ceiling) {rate:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
