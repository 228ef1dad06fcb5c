"""Load test of `torchbridge serve`: batched vs one-request-at-a-time, and infinity-emb.

Real models (all-MiniLM-L6-v2 embeddings, SmolLM2-135M completions) from
`torchbridge.bench.assets`, real review sentences as inputs. Every server is started here as a
subprocess on a free 127.0.0.1 port; traffic goes only there, each concurrency level is bounded
in request count and in time (no new request after `--level-seconds`), and every server is
stopped at the end. Writes serve.json and serve.png (matplotlib) to --output.

    python benchmarks/bench_serve.py --output bench-results/serve

Rows per (server, concurrency): requests/s, tokens/s, latency p50/p90/p99 (after a warm-up
round that is not timed), status counts. Ratios vs the one-at-a-time server of the same model at
the same concurrency are computed in this run. `--memory-requests N` sends N embedding requests
to the batched server and samples its RSS every N/10 (the "memory stays flat" check).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
INFINITY_BIN = "/tmp/infvenv/bin/infinity_emb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, argv: list[str], port: int, env: dict | None = None,
                 health: str = "/health") -> None:
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{name}.log", "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.health = health

    def wait(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see "
                                   f"{self.log.name}")
            try:
                if httpx.get(self.url + self.health, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer {self.health} within {timeout} s")

    def rss_mb(self) -> float | None:
        try:
            import psutil

            return psutil.Process(self.proc.pid).memory_info().rss / 2**20
        except Exception:  # noqa: BLE001 - psutil missing or process gone
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def torchbridge_server(name: str, model: Path, task: str, extra: list[str]) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "torchbridge.cli", "serve", str(model), "--task", task,
            "--port", str(port), "--served-model-name", "bench", *extra]
    return Server(name, argv, port)


async def load(url: str, path: str, bodies: list[dict], concurrency: int, seconds: float,
               token_key: str) -> dict[str, Any]:
    """`concurrency` clients each sending the next body as soon as their last one answered."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    tokens = 0
    nxt = 0
    stop_at = time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal nxt, tokens
        while nxt < len(bodies) and time.perf_counter() < stop_at:
            body = bodies[nxt]
            nxt += 1
            t0 = time.perf_counter()
            try:
                r = await c.post(path, json=body)
                code = str(r.status_code)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    tokens += r.json()["usage"][token_key]
            except httpx.HTTPError as e:
                code = type(e).__name__
            statuses[code] = statuses.get(code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency + 4)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {"concurrency": concurrency, "requests": sum(statuses.values()), "statuses": statuses,
            "wall_s": wall, "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99))}


def run_levels(server: Server, path: str, make_body, levels: list[int], per_level: int,
               seconds: float, token_key: str, warmup: int) -> list[dict]:
    asyncio.run(load(server.url, path, [make_body(i) for i in range(warmup)], min(warmup, 8),
                     600, token_key))  # warm-up: first calls, allocation, not timed
    rows = []
    for c in levels:
        n = max(per_level, 2 * c)
        row = asyncio.run(load(server.url, path, [make_body(i) for i in range(n)], c, seconds,
                               token_key))
        row["server"], row["rss_mb"] = server.name, server.rss_mb()
        print(f"  {server.name:28s} c={c:3d} {row['requests_per_s']:8.1f} req/s "
              f"{row['tokens_per_s']:9.1f} tok/s p50 {row['p50_ms']:8.1f} ms "
              f"p99 {row['p99_ms']:8.1f} ms {row['statuses']}", flush=True)
        rows.append(row)
    return rows


def memory_check(server: Server, make_body, total: int, concurrency: int) -> list[dict]:
    samples = [{"requests": 0, "rss_mb": server.rss_mb()}]
    step = max(1, total // 10)
    done = 0
    while done < total:
        n = min(step, total - done)
        r = asyncio.run(load(server.url, "/v1/embeddings", [make_body(done + i) for i in range(n)],
                             concurrency, 3600, "prompt_tokens"))
        done += n
        samples.append({"requests": done, "rss_mb": server.rss_mb(), "statuses": r["statuses"]})
        print(f"  memory: {done} requests, RSS {samples[-1]['rss_mb']:.0f} MB", flush=True)
    return samples


def chart(doc: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install torchbridge[bench])"
    parts = [k for k in ("embeddings", "completions") if doc.get(k)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        rows = doc[part]["rows"]
        metric = "requests_per_s" if part == "embeddings" else "tokens_per_s"
        for name in dict.fromkeys(r["server"] for r in rows):
            rs = [r for r in rows if r["server"] == name]
            ax.plot([r["concurrency"] for r in rs], [r[metric] for r in rs], marker="o",
                    label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"{part}: {doc[part]['model']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def ratios(rows: list[dict], base: str, metric: str) -> dict[str, dict[int, float]]:
    ref = {r["concurrency"]: r[metric] for r in rows if r["server"] == base}
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["server"] != base and ref.get(r["concurrency"]):
            out.setdefault(r["server"], {})[r["concurrency"]] = r[metric] / ref[r["concurrency"]]
    return out


def bench_embeddings(args, sentences: list[str], doc: dict) -> None:
    from torchbridge.bench.assets.minilm import minilm_dir

    model = minilm_dir()
    body = lambda i: {"input": sentences[i % len(sentences)], "model": "bench"}  # noqa: E731
    rows: list[dict] = []
    configs = [("torchbridge batched", ["--max-wait-ms", str(args.max_wait_ms)]),
               ("torchbridge one-at-a-time", ["--no-batching"])]
    compile_flag = [] if args.compile else ["--no-compile"]
    memory = None
    for name, extra in configs:
        print(f"embeddings: {name}", flush=True)
        server = torchbridge_server(name, model, "feature-extraction", extra + compile_flag)
        try:
            server.wait()
            rows += run_levels(server, "/v1/embeddings", body, args.concurrency, args.requests,
                               args.level_seconds, "prompt_tokens", warmup=16)
            if name == "torchbridge batched" and args.memory_requests:
                memory = memory_check(server, body, args.memory_requests, 32)
        finally:
            server.stop()
    infinity_note = None
    if Path(args.infinity_bin).exists():
        print("embeddings: infinity-emb", flush=True)
        port = free_port()
        server = Server("infinity-emb", [args.infinity_bin, "v2",
                                         "--model-id", str(model), "--port", str(port),
                                         "--host", "127.0.0.1", "--engine", "torch",
                                         "--device", "cpu", "--served-model-name", "bench"],
                        port, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                   "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"})
        try:
            server.wait(300)
            rows += run_levels(server, "/embeddings", body, args.concurrency, args.requests,
                               args.level_seconds, "prompt_tokens", warmup=16)
        except RuntimeError as e:
            infinity_note = f"infinity-emb did not run: {e}"
        finally:
            server.stop()
    else:
        infinity_note = (f"infinity-emb not measured: no {args.infinity_bin} "
                         "(install infinity-emb in a separate venv, see docs/serve.md)")
    doc["embeddings"] = {"model": "all-MiniLM-L6-v2", "rows": rows, "infinity_note": infinity_note,
                         "speedup_vs_one_at_a_time": ratios(rows, "torchbridge one-at-a-time",
                                                            "requests_per_s"),
                         "memory": memory}


def bench_completions(args, sentences: list[str], doc: dict) -> None:
    from torchbridge.bench.assets.smollm2 import smollm2_dir

    model = smollm2_dir()
    body = lambda i: {"prompt": sentences[i % len(sentences)], "model": "bench",  # noqa: E731
                      "max_tokens": args.max_tokens, "temperature": 0}
    rows: list[dict] = []
    compile_flag = [] if args.compile else ["--no-compile"]
    for name, extra in (("torchbridge continuous", ["--slots", str(args.slots)]),
                        ("torchbridge one-at-a-time", ["--no-batching"])):
        print(f"completions: {name}", flush=True)
        server = torchbridge_server(name, model, "causal-lm",
                                    extra + compile_flag + ["--max-model-len", "512"])
        try:
            server.wait()
            rows += run_levels(server, "/v1/completions", body, args.gen_concurrency,
                               args.gen_requests, args.level_seconds, "completion_tokens",
                               warmup=2)
        finally:
            server.stop()
    doc["completions"] = {"model": "SmolLM2-135M-Instruct", "max_tokens": args.max_tokens,
                          "rows": rows,
                          "speedup_vs_one_at_a_time": ratios(rows, "torchbridge one-at-a-time",
                                                             "tokens_per_s")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=ROOT / "bench-results" / "serve")
    p.add_argument("--what", default="embeddings,completions")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--gen-concurrency", default="1,8,32,64")
    p.add_argument("--requests", type=int, default=256, help="embedding requests per level")
    p.add_argument("--gen-requests", type=int, default=8, help="completions per level (>= 2c)")
    p.add_argument("--level-seconds", type=float, default=60,
                   help="no new request after this many seconds of a level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5)
    p.add_argument("--memory-requests", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="servers with torch.compile (slow start)")
    p.add_argument("--infinity-bin", default=INFINITY_BIN,
                   help="infinity_emb executable (a separate venv: its pins clash with ours)")
    args = p.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.gen_concurrency = [int(x) for x in args.gen_concurrency.split(",")]
    from torchbridge.bench.assets.minilm import review_sentences
    from torchbridge.bench.runner import env_report

    sentences = review_sentences(2000)
    doc: dict[str, Any] = {"env": env_report("cpu"), "args": {k: str(v) for k, v in
                                                             vars(args).items()},
                           "command": " ".join(sys.argv)}
    what = args.what.split(",")
    if "embeddings" in what:
        bench_embeddings(args, sentences, doc)
    if "completions" in what:
        bench_completions(args, sentences, doc)
    args.output.mkdir(parents=True, exist_ok=True)
    note = chart(doc, args.output / "serve.png")
    doc["chart"] = note or str(args.output / "serve.png")
    (args.output / "serve.json").write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {args.output / 'serve.json'}" + (f" ({note})" if note else ""))


if __name__ == "__main__":
    main()
