"""What the load generator itself costs: CPU per request of the client and of the server, httpx vs aiohttp.

On a small shared machine the client of a load test competes with the server it measures. This
starts the batched MiniLM embeddings server (real all-MiniLM-L6-v2) on a free 127.0.0.1 port,
sends the same bounded load with each client library in turn, and reads the CPU seconds both
processes spent (psutil), per request. It is why benchmarks/bench_serve.py drives load with
aiohttp. Writes JSON:

    python benchmarks/serve_client_cost.py --output bench-results/serve_client_cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from bench_serve import load as load_aiohttp
from bench_serve import torchbridge_server


async def load_httpx(url: str, path: str, bodies: list[dict], concurrency: int) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    nxt = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal nxt
        while nxt < len(bodies):
            body = bodies[nxt]
            nxt += 1
            r = await c.post(path, json=body)
            r.json()
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
    return {"requests_per_s": len(bodies) / (time.perf_counter() - t0), "statuses": statuses}


def cpu_s(process: psutil.Process) -> float:
    t = process.cpu_times()
    return t.user + t.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--output", type=Path, default=Path("bench-results/serve_client_cost.json"))
    args = parser.parse_args()
    from torchbridge.bench.assets.minilm import minilm_dir, review_sentences

    sentences = review_sentences()
    bodies = [{"input": sentences[i % len(sentences)], "model": "bench"}
              for i in range(args.requests)]
    server = torchbridge_server("client-cost", minilm_dir(), "feature-extraction", [])
    rows = []
    try:
        server.wait(300)
        path = "/v1/embeddings"
        asyncio.run(load_aiohttp(server.url, path, bodies[:64], 8, 600, "prompt_tokens"))  # warm-up
        me, srv = psutil.Process(), psutil.Process(server.proc.pid)
        runs = {"httpx": lambda: load_httpx(server.url, path, bodies, args.concurrency),
                "aiohttp": lambda: load_aiohttp(server.url, path, bodies, args.concurrency, 3600,
                                                "prompt_tokens")}
        for name, run in runs.items():
            c0, s0 = cpu_s(me), cpu_s(srv)
            result = asyncio.run(run())
            c1, s1 = cpu_s(me), cpu_s(srv)
            row = {"client": name, "requests": args.requests, "concurrency": args.concurrency,
                   "requests_per_s": round(result["requests_per_s"], 1),
                   "client_cpu_ms_per_request": round(1e3 * (c1 - c0) / args.requests, 2),
                   "server_cpu_ms_per_request": round(1e3 * (s1 - s0) / args.requests, 2),
                   "statuses": result["statuses"]}
            rows.append(row)
            print(row, flush=True)
    finally:
        server.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"torch_threads": "server default", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
