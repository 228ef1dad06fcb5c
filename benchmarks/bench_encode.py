"""Sentence embeddings over real text: torchbridge `encode` vs sentence-transformers vs a plain HF loop.

Real all-MiniLM-L6-v2 weights and real Rotten Tomatoes review sentences (torchbridge.bench.assets).
Every row encodes the same sentences with the same batch size and the same torch threads, in one
process; rows run round-robin (one pass each per round) so that load on this shared machine hits
them alike. Reported per row: setup time and first-call time apart (torch.compile runs there),
then sentences/s as the median and p90 (slow tail) over the timed rounds, the ratio to
sentence-transformers' torch backend per round (median of the per-round ratios), and cosine
similarity of every embedding to the fp32 reference (the plain HF loop, fp32 eager) with a check
that row i of the output is the embedding of sentence i.

With ``--ray``, the same sentences also go through ``torchbridge run`` as a Parquet file, once on
the local engine and once on the Ray engine (a one-machine cluster), both loading the folder written
by ``torchbridge optimize``; rows/s end to end including model load in both.

With ``--long-rows N``, first (before any other row, so nothing else has grown the process) a long
job on the default torchbridge model (bf16 on CPU): the sentences repeated and shuffled to N rows,
encoded chunk by chunk with the default token budget, as a batch job or the file runner does. Process
RSS is read after each chunk, with the distinct (rows, width) input shapes the model has met so far:
oneDNN keeps kernels per shape, so memory is flat only if that set stops growing. Reported: RSS
after the first quarter and at the end, peak RSS, rows/s. ``--rows ''`` runs the long job alone.

    python benchmarks/bench_encode.py --sentences 10000 --batch-size 32 --rounds 3 --ray \
        --output bench-results/encode
    python benchmarks/bench_encode.py --rows '' --long-rows 20000 --threads 1 \
        --output bench-results/encode-rss
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchbridge.bench.assets._fetch import AssetUnavailableError
from torchbridge.bench.assets.minilm import minilm_dir, review_sentences
from torchbridge.bench.environment import env_report
from torchbridge.bench.harness import percentile

REFERENCE = "hf_loop_fp32"
BASELINE = "st_torch"


def hf_loop(folder: Path, batch_size: int):
    """The plain loop people write: input order, pad per batch, fp32 eager, mean pooling."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()

    def run(texts: list[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                batch = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256,
                            return_tensors="pt")
                h = model(**batch).last_hidden_state
                m = batch["attention_mask"].unsqueeze(-1).float()
                out.append(((h * m).sum(1) / m.sum(1)).numpy())
        return np.concatenate(out)

    return run


def sentence_transformers_row(folder: Path, batch_size: int, backend: str):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu", backend=backend)
    return lambda texts: model.encode(texts, batch_size=batch_size, convert_to_numpy=True)


def torchbridge_row(folder: Path, batch_size: int, **config: Any):
    from torchbridge.data import encode
    from torchbridge.data.pooling import pooling_for
    from torchbridge.models.text import create_optimized_text_model

    model = create_optimized_text_model(str(folder), task="feature-extraction", **config)
    runner = lambda texts: encode(model, texts, batch_size=batch_size, progress=False)  # noqa: E731
    runner.details = {"dtype": model.report.weight_dtype, "compiled": model.report.compiled,  # type: ignore[attr-defined]
                      "quantization": model.report.plan.quantization, "pooling": str(pooling_for(model))}
    return runner


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def same_order(emb: np.ndarray, ref: np.ndarray, n: int = 2000) -> bool:
    """Row i is closest to reference row i among the first n rows (distinct sentences)."""
    a = emb[:n] / np.linalg.norm(emb[:n], axis=1, keepdims=True)
    b = ref[:n] / np.linalg.norm(ref[:n], axis=1, keepdims=True)
    return bool((np.argmax(a @ b.T, axis=1) == np.arange(len(a))).all())


def bench_rows(args: argparse.Namespace, folder: Path, sentences: list[str]) -> dict[str, Any]:
    builders = {
        REFERENCE: lambda: hf_loop(folder, args.batch_size),
        BASELINE: lambda: sentence_transformers_row(folder, args.batch_size, "torch"),
        "st_onnx": lambda: sentence_transformers_row(folder, args.batch_size, "onnx"),
        "torchbridge": lambda: torchbridge_row(folder, args.batch_size),
        "torchbridge_int8": lambda: torchbridge_row(folder, args.batch_size,
                                                     quantization="int8-dynamic"),
        "torchbridge_int8_static": lambda: torchbridge_row(folder, args.batch_size,
                                                            quantization="int8-static"),
    }
    rows: dict[str, dict[str, Any]] = {}
    runners = {}
    for name in filter(None, args.rows.split(",")):
        t0 = time.perf_counter()
        try:
            runner = builders[name]()
        except Exception as err:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            rows[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
            print(f"{name}: unavailable ({rows[name]['error']})", file=sys.stderr)
            continue
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner(sentences[: args.warmup_sentences])
        rows[name] = {"setup_s": round(setup, 3),
                      "first_call_s": round(time.perf_counter() - t0, 3),
                      "samples_s": [], **getattr(runner, "details", {})}
        runners[name] = runner
        print(f"{name}: setup {setup:.1f}s, first call {rows[name]['first_call_s']:.1f}s",
              file=sys.stderr)
    outputs: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            outputs[name] = runner(sentences)
            dt = time.perf_counter() - t0
            rows[name]["samples_s"].append(round(dt, 3))
            print(f"round {r}: {name} {len(sentences) / dt:.1f} sentences/s", file=sys.stderr)
    for name in runners:
        row, samples = rows[name], rows[name]["samples_s"]
        row["sentences_per_s_median"] = round(len(sentences) / percentile(samples, 50), 1)
        row["sentences_per_s_p90"] = round(len(sentences) / percentile(samples, 90), 1)
        if REFERENCE in outputs:
            cos = cosine_rows(outputs[name], outputs[REFERENCE])
            row["cosine_to_fp32_min"] = round(float(cos.min()), 6)
            row["cosine_to_fp32_mean"] = round(float(cos.mean()), 6)
            row["same_order_as_input"] = same_order(outputs[name], outputs[REFERENCE])
        if BASELINE in runners:
            ratios = [rows[BASELINE]["samples_s"][i] / samples[i] for i in range(args.rounds)]
            row["speedup_vs_st_torch"] = round(statistics.median(ratios), 3)
    return rows


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def bench_long(args: argparse.Namespace, folder: Path, sentences: list[str]) -> dict[str, Any]:
    """RSS over a long encode job (see module docstring); checkpoints after every chunk."""
    from torchbridge.data import encode
    from torchbridge.models.text import create_optimized_text_model

    rss_start = _rss_mib()
    model = create_optimized_text_model(str(folder), task="feature-extraction")
    texts = (sentences * (args.long_rows // len(sentences) + 1))[: args.long_rows]
    random.Random(0).shuffle(texts)
    shapes: set[tuple[int, int]] = set()  # what the model's layers meet, after padding trimming
    model.model.get_input_embeddings().register_forward_hook(
        lambda m, i, o: shapes.add(tuple(i[0].shape)))
    rss_loaded = _rss_mib()
    checkpoints, done, seconds = [], 0, 0.0
    chunk = -(-len(texts) // args.long_chunks)
    for start in range(0, len(texts), chunk):
        part = texts[start:start + chunk]
        t0 = time.perf_counter()
        out = encode(model, part, progress=False)
        seconds += time.perf_counter() - t0
        assert out.shape[0] == len(part)
        done += len(part)
        checkpoints.append({"rows": done, "rss_mib": round(_rss_mib(), 1), "shapes": len(shapes)})
        print(f"long job: {done} rows, RSS {checkpoints[-1]['rss_mib']} MiB, "
              f"{len(shapes)} shapes", file=sys.stderr)
    quarter = next(c for c in checkpoints if c["rows"] >= len(texts) / 4)
    end = checkpoints[-1]
    return {"rows": len(texts), "distinct_sentences": len(sentences), "chunk_rows": chunk,
            "dtype": model.report.weight_dtype, "compiled": model.report.compiled,
            "threads": torch.get_num_threads(),
            "rss_before_load_mib": round(rss_start, 1), "rss_loaded_mib": round(rss_loaded, 1),
            "rss_quarter_mib": quarter["rss_mib"], "rss_end_mib": end["rss_mib"],
            "growth_after_quarter_mib": round(end["rss_mib"] - quarter["rss_mib"], 1),
            # ru_maxrss is KiB on Linux: the process peak, model loading included
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "shapes_quarter": quarter["shapes"], "shapes_end": end["shapes"],
            "rows_per_s": round(len(texts) / seconds, 1), "checkpoints": checkpoints}


def bench_ray(args: argparse.Namespace, folder: Path, sentences: list[str], out: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from torchbridge.data.ray_engine import RaySpec, run_ray
    from torchbridge.data.run import RunSpec, run_file
    from torchbridge.data.table import Options
    from torchbridge.models.text import TextModelOptimizer, create_optimized_text_model

    tmp = tempfile.TemporaryDirectory(prefix="bench-encode-ray-")  # removed when this returns
    work = Path(tmp.name)
    saved = work / "minilm-optimized"
    t0 = time.perf_counter()
    optimizer = TextModelOptimizer()  # what `torchbridge optimize FOLDER --output DIR` does
    optimizer.save_pretrained(optimizer.optimize(str(folder), task="feature-extraction"), saved,
                              source=str(folder))
    optimize_s = time.perf_counter() - t0
    sentences = sentences * args.ray_repeat  # more rows: the actor's fixed start-up cost amortizes
    src = work / "sentences.parquet"
    pq.write_table(pa.table({"id": list(range(len(sentences))), "text": sentences}), src,
                   row_group_size=1000)
    options = Options(batch_size=args.batch_size)
    t0 = time.perf_counter()
    model = create_optimized_text_model(str(saved))
    load_s = time.perf_counter() - t0
    local = run_file(model, RunSpec(input=src, output=work / "local.parquet", options=options,
                                    shard_rows=2000, progress=False))
    local_s = time.perf_counter() - t0
    del model
    cores = torch.get_num_threads()
    t0 = time.perf_counter()
    ray.init(num_cpus=cores + 1, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cluster_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        remote = run_ray(str(saved), RunSpec(input=src, output=work / "ray.parquet", options=options),
                         RaySpec(batch_rows=2000))
        ray_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    ids = pq.read_table(work / "ray.parquet", columns=["id"]).column("id").to_pylist()  # skips _files
    n = len(sentences)
    return {"rows": n, "optimize_folder_s": round(optimize_s, 2), "cluster_start_s": round(cluster_s, 2),
            "local": {"seconds_end_to_end": round(local_s, 2), "model_load_s": round(load_s, 2),
                      "rows_per_s": round(n / local_s, 1), "summary": local},
            "ray": {"seconds_end_to_end": round(ray_s, 2), "rows_per_s": round(n / ray_s, 1),
                    "actors": remote["actors"], "cpus_per_actor": remote["cpus_per_actor"],
                    "every_row_once": sorted(ids) == list(range(n)), "summary": remote},
            "ray_over_local": round(local_s / ray_s, 3)}


def chart(doc: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib missing: no chart (pip install torchbridge[bench])"
    rows = {k: v for k, v in doc["rows"].items() if "sentences_per_s_median" in v}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(rows)
    med = [rows[n]["sentences_per_s_median"] for n in names]
    p90 = [rows[n]["sentences_per_s_p90"] for n in names]
    ax.barh(names, med, color="#4c72b0", label="median")
    ax.scatter(p90, names, color="black", marker="|", s=200, label="p90 (slow tail)")
    ax.set_xlabel(f"sentences/s ({doc['sentences']} review sentences, batch {doc['batch_size']}, "
                  f"{doc['threads']} threads)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=3, help="timed passes per row, round-robin")
    p.add_argument("--warmup-sentences", type=int, default=512, help="first call, not timed")
    p.add_argument("--rows", default=f"{REFERENCE},{BASELINE},st_onnx,torchbridge,torchbridge_int8,"
                                     "torchbridge_int8_static")
    p.add_argument("--ray", action="store_true", help="also local vs Ray engine over Parquet")
    p.add_argument("--ray-repeat", type=int, default=1,
                   help="Ray vs local: the sentences repeated N times (rows with new ids)")
    p.add_argument("--long-rows", type=int, default=0,
                   help="also RSS over a long encode job of this many rows (0: off)")
    p.add_argument("--long-chunks", type=int, default=20,
                   help="the long job's chunks, one encode call and one RSS checkpoint each")
    p.add_argument("--output", type=Path, default=Path("bench-results/encode"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        folder = minilm_dir()
        sentences = review_sentences(args.sentences)
    except AssetUnavailableError as err:
        print(f"skipped: {err}", file=sys.stderr)
        return 2
    if len(sentences) < args.sentences:
        print(f"note: only {len(sentences)} sentences available", file=sys.stderr)
    doc: dict[str, Any] = {"benchmark": "encode", "model": "all-MiniLM-L6-v2", "env": env_report(),
                           "sentences": len(sentences), "batch_size": args.batch_size,
                           "threads": torch.get_num_threads(), "rounds": args.rounds}
    args.output.mkdir(parents=True, exist_ok=True)
    if args.long_rows:  # first: the RSS read is of this job alone
        doc["long_job"] = bench_long(args, folder, review_sentences())
    doc["rows"] = bench_rows(args, folder, sentences) if args.rows else {}
    # written now too, so a failure in the Ray part keeps the rows' numbers
    (args.output / "encode.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    if args.ray:
        doc["ray_vs_local"] = bench_ray(args, folder, sentences, args.output)
    note = chart(doc, args.output / "encode.png") if doc["rows"] else None
    if note:
        doc["chart"] = note
        print(note, file=sys.stderr)
    (args.output / "encode.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    for name, row in doc["rows"].items():
        print(f"{name:18s} " + ("  ".join(f"{k}={row[k]}" for k in (
            "sentences_per_s_median", "sentences_per_s_p90", "speedup_vs_st_torch",
            "cosine_to_fp32_min", "same_order_as_input", "setup_s", "first_call_s") if k in row)
            or row.get("error", "")))
    if "long_job" in doc:
        r = doc["long_job"]
        print(f"long job ({r['rows']} rows, {r['dtype']}, {r['threads']} threads): RSS at 25% "
              f"{r['rss_quarter_mib']} MiB, at end {r['rss_end_mib']} MiB "
              f"({r['growth_after_quarter_mib']:+} MiB), peak {r['peak_rss_mib']} MiB, shapes "
              f"{r['shapes_quarter']} -> {r['shapes_end']}, {r['rows_per_s']} rows/s")
    if "ray_vs_local" in doc:
        r = doc["ray_vs_local"]
        print(f"ray vs local: local {r['local']['rows_per_s']} rows/s, ray {r['ray']['rows_per_s']} "
              f"rows/s, ratio {r['ray_over_local']}, every row once: {r['ray']['every_row_once']}")
    print(f"wrote {args.output / 'encode.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
