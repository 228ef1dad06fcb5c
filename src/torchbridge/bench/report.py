"""Writers for a benchmark results document: results.json, results.md and a PNG chart."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "—"
    return format(value, spec)


def markdown_table(doc: dict[str, Any]) -> str:
    """The rows as a GitHub markdown table, with the workload and device above it."""
    wl, dev = doc["workload"], doc["env"]["device"]
    gen = wl["task"] == "causal-lm"
    shape = (f"batch {wl['batch_size']}, prompt {wl['seq_len']}, {wl['new_tokens']} new tokens"
             if gen else f"batch {wl['batch_size']} x seq {wl['seq_len']}")
    weights = "random weights" if wl["random_weights"] else "real weights"
    lines = [
        f"### {wl['model']} ({wl['task']}), {shape}, {weights}",
        "",
        f"Device: {dev['name']} ({dev['type']}, {dev['threads']} threads, ISA: "
        f"{', '.join(dev.get('cpu_isa') or []) or 'n/a'}); torch {doc['env']['torch']}, "
        f"transformers {doc['env']['transformers']}; median of {wl['runs']} runs after "
        f"{wl['warmup']} warm-up calls; first call reported apart.",
        "",
    ]
    rate_head = "ms/token | GB/s | of read rate" if gen else "GFLOP/s | of GEMM ceiling"
    agree = "greedy agree" if gen else "argmax agree"
    lines.append(f"| backend | inputs | dtype | median ms | p90 ms | throughput | speedup | "
                 f"first call s | setup s | peak MB | max abs diff | {agree} | {rate_head} |")
    lines.append("|" + "---|" * (14 + (1 if gen else 0)))
    for r in doc["rows"]:
        if r["status"] != "ok":
            cells = [r["name"], r["variant"], f"**{r['status']}**: {r['reason']}"]
            lines.append("| " + " | ".join(cells) + " |" + " |" * (11 + (1 if gen else 0)))
            continue
        thr = f"{r['throughput']:.1f} {r['throughput_unit'].split('/')[0]}/s"
        share = "—" if r.get("of_ceiling") is None else f"{r['of_ceiling']:.0%}"
        rate = (f"{_fmt(r['ms_per_token'], '.2f')} | {_fmt(r['gb_per_s'], '.1f')} | {share}"
                if gen else f"{_fmt(r['gflops'], '.0f')} | {share}")
        agreement = None if r["agreement"] is None else f"{r['agreement']:.1%}"
        cells = [r["name"], r["variant"], r["dtype"] or "—", _fmt(r["median_ms"]),
                 _fmt(r["p90_ms"]), thr, _fmt(r["speedup"], ".2f") + "x",
                 _fmt(r["first_call_s"], ".2f"), _fmt(r["setup_s"], ".1f"),
                 _fmt(r["peak_mem_mb"], ".0f"), _fmt(r["max_abs_diff"], ".1e"),
                 agreement or "—", rate]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Peak MB: growth of the process peak resident memory (CPU) or of the allocator "
              "peak (GPU) while the row was built and run, over what was resident before it."]
    if gen:
        lines += ["", "GB/s: weight bytes over time per token. Exact for torchbridge rows (the bytes "
                      "one decode step reads); the model's size for the other torch rows; the "
                      "converted file's size for runtimes, which can count an embedding table a "
                      "step does not read (a share of the read rate over 100% means that)."]
    if doc.get("ceiling"):
        c = doc["ceiling"]
        best = ", ".join(f"{k} {v:.0f}" for k, v in c["ceiling_gflops"].items())
        lines += ["", f"Ceilings measured at the start of this run (bench/ceiling.py): best GEMM "
                      f"GFLOP/s per precision at BERT-base shapes {best}; memory reads "
                      f"{c['read_gb_per_s']:.1f} GB/s."]
    notes = [f"{r['name']}: {r['notes']}" for r in doc["rows"]
             if r["status"] == "ok" and r["notes"] and r["variant"] == "full"]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def write_chart(doc: dict[str, Any], path: Path) -> Path:
    """Horizontal latency bars per input variant, each labelled with its speedup."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window or need a display
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if r["status"] == "ok"]
    variants = list(dict.fromkeys(r["variant"] for r in rows)) or ["full"]
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 0.5 * max(
        4, len(rows) // len(variants)) + 1.5), squeeze=False)
    for ax, variant in zip(axes[0], variants, strict=True):
        sel = [r for r in rows if r["variant"] == variant]
        labels = [f"{r['name']} ({r['dtype']})" for r in sel]
        values = [r["median_ms"] for r in sel]
        colors = ["#888888" if r["kind"] == "baseline" else
                  "#d62728" if r["kind"] == "optimized" else "#1f77b4" for r in sel]
        bars = ax.barh(labels, values, color=colors)
        ax.invert_yaxis()
        top = max(values) if values else 1.0
        for bar, r in zip(bars, sel, strict=True):
            ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2,
                    f"{r['speedup']:.2f}x" if r["speedup"] else "", va="center", fontsize=9)
        ax.set_xlim(0, top * 1.18)
        ax.set_xlabel("median latency per call (ms), lower is better")
        ax.set_title(f"{variant} inputs")
    wl = doc["workload"]
    fig.suptitle(f"{wl['model']} {wl['task']} on {doc['env']['device']['name']}"
                 + (" (random weights)" if wl["random_weights"] else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(doc: dict[str, Any], out_dir: Path, *, chart: bool = True) -> dict[str, Path]:
    """results.png (when matplotlib is installed; otherwise the JSON's notes and a line on stderr
    say it was skipped and why), results.json and results.md into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    if chart:
        try:
            paths["chart"] = write_chart(doc, out_dir / "results.png")
        except ImportError:
            note = "chart skipped: matplotlib is not installed (pip install matplotlib)"
            doc.setdefault("notes", []).append(note)
            print(f"torchbridge: {note}", file=sys.stderr)
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown_table(doc))
    return paths


def write_study(path: Path, rows: list[dict[str, Any]], **fields: Any) -> None:
    """A benchmark study's rows (``benchmarks/``) as JSON at ``path``, with the CPU, the torch
    version and the thread count."""
    import torch

    from torchbridge.backends import describe, detect

    result = {"device": describe(detect("cpu")), "torch": torch.__version__,
              "threads": torch.get_num_threads(), **fields, "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
