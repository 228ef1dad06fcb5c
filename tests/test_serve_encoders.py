"""`torchbridge serve` for encoders, through a real uvicorn server and an httpx client."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
import numpy as np
import pytest
from serve_helpers import metric, running

from torchbridge.data.inference import encode, predict
from torchbridge.models.text import create_optimized_text_model
from torchbridge.serve import ServeSettings, create_app
from torchbridge.serve.batching import EncoderBatcher

TEXTS = ["the movie is great", "i didn't like it at all", "john works at google in new york",
         "this film was not very fun", "bad", "a good movie and a great film",
         "it was boring", "the film is good"]


@pytest.fixture(scope="module")
def classifier(tiny_bert_dir):
    return create_optimized_text_model(str(tiny_bert_dir), task="sequence-classification",
                                       use_torch_compile=False, warmup_steps=1, warmup_seq_len=16)


def _settings(**kw) -> ServeSettings:
    kw.setdefault("model_id", "tiny-bert")
    return ServeSettings(**kw)


async def _concurrent(url: str, bodies: list[dict], path: str = "/v1/embeddings",
                      headers: dict | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post(path, json=b, headers=headers) for b in bodies))


def test_embeddings_equal_library_batched_across_requests(classifier):
    app = create_app(classifier, _settings(max_wait_ms=100))
    with running(app) as (url, _):
        replies = asyncio.run(_concurrent(url, [{"input": t, "model": "tiny-bert"}
                                                for t in TEXTS]))
        assert [r.status_code for r in replies] == [200] * len(TEXTS)
        expected = encode(classifier, TEXTS, normalize=True)
        for r, want in zip(replies, expected, strict=True):
            body = r.json()
            assert body["object"] == "list" and body["model"] == "tiny-bert"
            got = np.array(body["data"][0]["embedding"], dtype=np.float32)
            np.testing.assert_allclose(got, want, atol=1e-5)
            assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
        # a list input and base64 floats give the same vectors, in order
        r = httpx.post(url + "/v1/embeddings",
                       json={"input": TEXTS[:3], "encoding_format": "base64"})
        vecs = [np.frombuffer(base64.b64decode(d["embedding"]), dtype=np.float32)
                for d in r.json()["data"]]
        np.testing.assert_allclose(np.stack(vecs), expected[:3], atol=1e-5)
        m = httpx.get(url + "/metrics").text
        calls = metric(m, "torchbridge_batch_size_count", queue="embeddings")
        singles = metric(m, "torchbridge_batch_size_bucket", queue="embeddings", le="1.0")
        assert calls < len(TEXTS) + 1 and calls - singles >= 1  # some call held > 1 request
        assert metric(m, "torchbridge_requests_total", endpoint="/v1/embeddings",
                      status="200") == len(TEXTS) + 1
        assert metric(m, "torchbridge_request_latency_seconds_count",
                      endpoint="/v1/embeddings") == len(TEXTS) + 1


def test_no_batching_serves_one_request_per_call(classifier):
    app = create_app(classifier, _settings(batching=False, max_wait_ms=100))
    with running(app) as (url, _):
        replies = asyncio.run(_concurrent(url, [{"input": t} for t in TEXTS]))
        assert all(r.status_code == 200 for r in replies)
        m = httpx.get(url + "/metrics").text
        calls = metric(m, "torchbridge_batch_size_count", queue="embeddings")
        assert calls == len(TEXTS)
        assert metric(m, "torchbridge_batch_size_bucket", queue="embeddings", le="1.0") == calls


def test_classify_errors_and_auth(classifier):
    app = create_app(classifier, _settings(api_key="sekret"))
    key = {"Authorization": "Bearer sekret"}
    with running(app) as (url, _):
        c = httpx.Client(base_url=url, timeout=30)
        assert c.get("/health").status_code == 200  # health stays open for probes
        assert c.post("/v1/classify", json={"input": "bad"}).status_code == 401
        wrong = c.post("/v1/classify", json={"input": "bad"},
                       headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
        r = c.post("/v1/classify", json={"input": TEXTS[:4]}, headers=key)
        assert r.status_code == 200
        want = predict(classifier, TEXTS[:4])
        for got, exp in zip(r.json()["data"], want, strict=True):
            assert got["label"] == exp["label"] and got["score"] == pytest.approx(exp["score"])
        assert c.get("/v1/models", headers=key).json()["data"][0]["id"] == "tiny-bert"
        # over the model's 128 positions: 400 naming the text and the limit
        r = c.post("/v1/classify", json={"input": ["good", "the " * 300]}, headers=key)
        assert r.status_code == 400
        msg = r.json()["error"]["message"]
        assert "input[1]" in msg and "limit of 128" in msg
        # malformed bodies: 422 naming the field
        for body, field in (({}, "input"), ({"input": 5}, "input"), ({"input": []}, "input"),
                            ({"input": "x", "temperature": 1}, "temperature")):
            r = c.post("/v1/classify", json=body, headers=key)
            assert r.status_code == 422 and field in r.json()["error"]["message"], body
        r = c.post("/v1/classify", content=b"{not json", headers=key)
        assert r.status_code == 422
        r = c.post("/v1/classify", json={"input": "x", "model": "gpt-4"}, headers=key)
        assert r.status_code == 404 and "tiny-bert" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": "x"}, headers=key)
        assert r.status_code == 404 and "sequence-classification" in r.json()["error"]["message"]


def test_twice_the_capacity_gives_results_or_429_and_the_server_stays_up(classifier):
    settings = _settings(max_queue=4, max_wait_ms=1)
    app = create_app(classifier, settings)
    batcher = app.state.server.embedder
    run = batcher.run

    def slow(texts):  # a slower model, so that 4 waiting requests is a real limit
        time.sleep(0.05)
        return run(texts)

    batcher.run = slow
    n = 2 * (settings.max_queue + 4)
    with running(app) as (url, _):
        replies = asyncio.run(_concurrent(url, [{"input": TEXTS[i % 8]} for i in range(n)]))
        codes = [r.status_code for r in replies]
        assert len(codes) == n and set(codes) <= {200, 429}
        assert codes.count(429) >= 1 and codes.count(200) >= settings.max_queue
        for r in replies:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
            else:
                assert len(r.json()["data"][0]["embedding"]) == 32
        assert httpx.get(url + "/health").json()["status"] == "ok"
        m = httpx.get(url + "/metrics").text
        assert metric(m, "torchbridge_requests_total", endpoint="/v1/embeddings",
                      status="429") == codes.count(429)


def test_a_failing_request_does_not_fail_its_batch_neighbours():
    calls = []

    def run(texts):
        calls.append(list(texts))
        if "boom" in texts:
            raise ValueError("cannot embed 'boom'")
        return [len(t) for t in texts]

    batcher = EncoderBatcher(run, name="test", max_wait_ms=200, max_batch_tokens=100)
    batcher.start()

    async def main():
        return await asyncio.gather(*(batcher.submit([t], 1) for t in ("ab", "boom", "abcd")),
                                    return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        batcher.close()
    assert results[0] == [2] and results[2] == [4]
    assert isinstance(results[1], ValueError) and "boom" in str(results[1])
    assert calls[0] == ["ab", "boom", "abcd"]  # one batch first, then each request alone


def test_cli_serves_a_folder_and_stops_on_sigint(tiny_bert_dir):
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchbridge.cli", "serve", str(tiny_bert_dir), "--no-compile",
         "--task", "feature-extraction", "--port", str(port), "--served-model-name", "mini"],
        stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        r = httpx.post(url + "/v1/embeddings", json={"input": ["good", "bad"], "model": "mini"})
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        assert httpx.get(url + "/health").json()["task"] == "feature-extraction"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
