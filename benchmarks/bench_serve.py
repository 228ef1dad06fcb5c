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
    """`concurrency` clients each sending the next body as soon as their last one answered.

    The clients use aiohttp: on these 2 shared cores the load generator competes with the server,
    and httpx's async client took 2.8 ms of CPU per request against aiohttp's 0.4 ms
    (benchmarks/serve_client_cost.py: the batched MiniLM server, 32 clients), so the lighter client
    leaves the
    server the CPU it is measured on. The tests use httpx; here only the cost matters."""
    import aiohttp

    latencies: list[float] = []
    statuses: dict[str, int] = {}
    tokens = 0
    nxt = 0
    stop_at = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal nxt, tokens
        while nxt < len(bodies) and time.perf_counter() < stop_at:
            body = bodies[nxt]
            nxt += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url + path, json=body) as r:
                    code = str(r.status)
                    data = await r.json(content_type=None)
                    if r.status == 200:
                        latencies.append(time.perf_counter() - t0)
                        tokens += data["usage"][token_key]
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                code = type(e).__name__
            statuses[code] = statuses.get(code, 0) + 1

    t0 = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {"concurrency": concurrency, "requests": sum(statuses.values()), "statuses": statuses,
            "wall_s": wall, "requests_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p90_ms": float(np.percentile(lat, 90)),
            "p99_ms": float(np.percentile(lat, 99))}


def run_levels(servers: list[tuple[Server, str]], make_body, levels: list[int], per_level: int,
               seconds: float, token_key: str, warmup: int, rounds: int) -> list[dict]:
    """All servers are up together; each level runs on each server in turn, `rounds` times with
    the order reversed every round, so that background load on a shared machine falls on all of
    them alike. Each row is the median over the rounds (every round is kept in `rounds`)."""
    for server, path in servers:  # warm-up: first calls, allocations; not timed
        asyncio.run(load(server.url, path, [make_body(i) for i in range(warmup)],
                         min(warmup, 8), 600, token_key))
    rows = []
    for c in levels:
        n = max(per_level, 2 * c)
        runs: dict[str, list[dict]] = {s.name: [] for s, _ in servers}
        for rnd in range(rounds):
            for server, path in (servers if rnd % 2 == 0 else servers[::-1]):
                r = asyncio.run(load(server.url, path, [make_body(i) for i in range(n)], c,
                                     seconds, token_key))
                r["rss_mb"] = server.rss_mb()
                runs[server.name].append(r)
        for name, rs in runs.items():
            row = {"server": name, "concurrency": c, "rounds": rs}
            for key in ("requests_per_s", "tokens_per_s", "p50_ms", "p90_ms", "p99_ms"):
                row[key] = float(np.median([r[key] for r in rs]))
            statuses: dict[str, int] = {}
            for r in rs:
                for k, v in r["statuses"].items():
                    statuses[k] = statuses.get(k, 0) + v
            row["statuses"] = statuses
            print(f"  {name:28s} c={c:3d} {row['requests_per_s']:8.1f} req/s "
                  f"{row['tokens_per_s']:9.1f} tok/s p50 {row['p50_ms']:8.1f} ms "
                  f"p99 {row['p99_ms']:8.1f} ms {statuses}", flush=True)
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
    if not parts:
        return "no HTTP load results to chart (engine rows are in serve.json)"
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


def infinity_server(args, model: Path) -> Server:
    port = free_port()
    return Server("infinity-emb", [args.infinity_bin, "v2", "--model-id", str(model),
                                   "--port", str(port), "--host", "127.0.0.1", "--engine", "torch",
                                   "--device", "cpu", "--served-model-name", "bench"],
                  port, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                             "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1"})


def bench_embeddings(args, sentences: list[str], doc: dict) -> None:
    from torchbridge.bench.assets.minilm import minilm_dir

    model = minilm_dir()
    body = lambda i: {"input": sentences[i % len(sentences)], "model": "bench"}  # noqa: E731
    flags = args.model_flags + ["--max-wait-ms", str(args.max_wait_ms)]
    batched = torchbridge_server("torchbridge batched", model, "feature-extraction", flags)
    single = torchbridge_server("torchbridge one-at-a-time", model, "feature-extraction",
                                flags + ["--no-batching"])
    servers = [(batched, "/v1/embeddings"), (single, "/v1/embeddings")]
    infinity_note = None
    if Path(args.infinity_bin).exists():
        servers.append((infinity_server(args, model), "/embeddings"))
    else:
        infinity_note = (f"infinity-emb not measured: no {args.infinity_bin} "
                         "(install infinity-emb in a separate venv, see docs/serve.md)")
    memory = None
    try:
        for server, _ in list(servers):
            try:
                server.wait(300)
            except RuntimeError as e:
                if server.name != "infinity-emb":
                    raise
                infinity_note = f"infinity-emb did not run: {e}"
                servers = [x for x in servers if x[0] is not server]
        print("embeddings: " + ", ".join(s.name for s, _ in servers), flush=True)
        rows = run_levels(servers, body, args.concurrency, args.requests, args.level_seconds,
                          "prompt_tokens", warmup=32, rounds=args.rounds)
        if args.memory_requests:
            memory = memory_check(batched, body, args.memory_requests, 32)
    finally:
        for server, _ in servers:
            server.stop()
    doc["embeddings"] = {"model": "all-MiniLM-L6-v2", "rows": rows, "infinity_note": infinity_note,
                         "speedup_vs_one_at_a_time": ratios(rows, "torchbridge one-at-a-time",
                                                            "requests_per_s"),
                         "vs_infinity": ratios(rows, "infinity-emb", "requests_per_s"),
                         "memory": memory}


def loadable_smollm2(folder: Path, out: Path) -> Path:
    """The SmolLM2 asset's config.json still carries the GGUF `quantization_config` it was
    converted from, which makes transformers refuse `.float()` / dtype casts of the (already
    dequantized, fp32) model; a copy of the folder without it loads like any HF checkpoint."""
    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" not in config:
        return folder
    out.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        target = out / f.name
        if f.name != "config.json" and not target.exists():
            target.symlink_to(f)
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def bench_completions(args, sentences: list[str], doc: dict) -> None:
    from torchbridge.bench.assets.smollm2 import smollm2_dir

    source = loadable_smollm2(smollm2_dir(), args.output / "SmolLM2-135M-Instruct")
    # optimize (and verify) once; both servers load the saved folder, as a deployment would
    model = args.output / "smollm2-optimized"
    if not (model / "config.json").exists():
        print("completions: torchbridge optimize (once)", flush=True)
        subprocess.run([sys.executable, "-m", "torchbridge.cli", "optimize", str(source),
                        "--task", "causal-lm", "--output", str(model), *args.model_flags],
                       check=True, stdout=subprocess.DEVNULL)
    body = lambda i: {"prompt": sentences[i % len(sentences)], "model": "bench",  # noqa: E731
                      "max_tokens": args.max_tokens, "temperature": 0}
    flags = args.model_flags + ["--max-model-len", "512"]
    servers = [(torchbridge_server("torchbridge continuous", model, "causal-lm",
                                   flags + ["--slots", str(args.slots)]), "/v1/completions"),
               (torchbridge_server("torchbridge one-at-a-time", model, "causal-lm",
                                   flags + ["--no-batching"]), "/v1/completions")]
    try:
        for server, _ in servers:
            server.wait(600)
        print("completions: " + ", ".join(s.name for s, _ in servers), flush=True)
        rows = run_levels(servers, body, args.gen_concurrency, args.gen_requests,
                          args.level_seconds, "completion_tokens", warmup=2,
                          rounds=args.gen_rounds)
    finally:
        for server, _ in servers:
            server.stop()
    doc["completions"] = {"model": "SmolLM2-135M-Instruct", "max_tokens": args.max_tokens,
                          "rows": rows,
                          "speedup_vs_one_at_a_time": ratios(rows, "torchbridge one-at-a-time",
                                                             "tokens_per_s")}


def bench_engine(args, sentences: list[str], doc: dict) -> None:
    """The continuous-batching engine without HTTP: the same greedy requests through
    `ContinuousBatcher` with `--gen-concurrency` slots (all requests queued at once, admitted
    as slots free up) vs one slot. Aggregate new tokens/s; a model loaded with transformers
    (fp32, no optimize / warm-up), so that this part fits a busy machine."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torchbridge.bench.assets.smollm2 import smollm2_dir
    from torchbridge.generation.continuous import ContinuousBatcher, GenerationRequest

    folder = loadable_smollm2(smollm2_dir(), args.output / "SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # every request makes max_tokens tokens
    rows = []
    for c in args.gen_concurrency:
        n = max(args.gen_requests, 2 * c)
        prompts = [tok(sentences[i])["input_ids"] for i in range(n)]
        for slots in dict.fromkeys((c, 1)):
            batcher = ContinuousBatcher(model, slots=slots, max_length=512)
            batcher.add(GenerationRequest(prompts[0], 2, {"do_sample": False}))  # warm-up
            while batcher.active:
                batcher.step()
            queue = [GenerationRequest(p, args.max_tokens, {"do_sample": False})
                     for p in prompts]
            done, t0 = 0, time.perf_counter()
            deadline = t0 + args.level_seconds * 4
            pending = list(queue)
            while (pending or batcher.active) and time.perf_counter() < deadline:
                while pending and batcher.free_slots:
                    batcher.add(pending.pop(0))
                batcher.step()
            wall = time.perf_counter() - t0
            done = [r for r in queue if r.finished]
            tokens = sum(len(r.tokens) for r in queue)
            row = {"slots": slots, "concurrency": c, "requests": n, "finished": len(done),
                   "new_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}
            print(f"  engine c={c:3d} slots={slots:3d}: {row['tokens_per_s']:7.1f} tok/s "
                  f"({len(done)}/{n} finished in {wall:.1f} s)", flush=True)
            rows.append(row)
    ratio = {}
    for c in args.gen_concurrency:
        one = [r for r in rows if r["concurrency"] == c and r["slots"] == 1]
        many = [r for r in rows if r["concurrency"] == c and r["slots"] == c]
        if one and many and c > 1:
            ratio[c] = many[0]["tokens_per_s"] / one[0]["tokens_per_s"]
    doc["engine"] = {"model": "SmolLM2-135M-Instruct (fp32, transformers weights)",
                     "max_tokens": args.max_tokens, "rows": rows,
                     "speedup_vs_one_slot": ratio}


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
    p.add_argument("--memory-requests", type=int, default=10000,
                   help="embedding requests for the RSS check (0: skip)")
    p.add_argument("--rounds", type=int, default=3, help="embeddings: rounds per level")
    p.add_argument("--gen-rounds", type=int, default=2, help="completions: rounds per level")
    p.add_argument("--dtype", default="auto", help="the servers' --dtype")
    p.add_argument("--compile", action="store_true", help="servers with torch.compile (slow start)")
    p.add_argument("--infinity-bin", default=INFINITY_BIN,
                   help="infinity_emb executable (a separate venv: its pins clash with ours)")
    args = p.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    args.gen_concurrency = [int(x) for x in args.gen_concurrency.split(",")]
    args.model_flags = ["--dtype", args.dtype] + ([] if args.compile else ["--no-compile"])
    from torchbridge.bench.assets.minilm import review_sentences
    from torchbridge.bench.environment import env_report

    sentences = review_sentences(2000)
    doc: dict[str, Any] = {"env": env_report("cpu"), "args": {k: str(v) for k, v in
                                                             vars(args).items()},
                           "command": " ".join(sys.argv)}
    what = args.what.split(",")
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / "serve.json"
    if out.exists():  # a run of one part keeps the other part's results
        previous = json.loads(out.read_text())
        for part in ("embeddings", "completions", "engine"):
            if part not in what and part in previous:
                doc[part] = previous[part]
                doc[f"{part}_command"] = previous.get(f"{part}_command", previous.get("command"))
    for part, run in (("embeddings", bench_embeddings), ("completions", bench_completions),
                      ("engine", bench_engine)):
        if part in what:
            run(args, sentences, doc)
            doc[f"{part}_command"] = doc["command"]
            write(doc, args.output)  # each part is kept even if a later one fails


def write(doc: dict, output: Path) -> None:
    note = chart(doc, output / "serve.png")
    doc["chart"] = note or str(output / "serve.png")
    (output / "serve.json").write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {output / 'serve.json'}" + (f" ({note})" if note else ""), flush=True)


if __name__ == "__main__":
    main()
