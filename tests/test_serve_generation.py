"""`torchbridge serve` for causal LMs (continuous batching) through a real server and client."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch
from serve_helpers import metric, running, tiny_causal_dir

from torchbridge.models.text import create_optimized_text_model
from torchbridge.serve import ServeSettings, create_app

PROMPTS = ["the cat sat on the mat", "a big red car", "dog", "the sun and the moon was very good",
           "night road", "green tree is small and blue"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tiny_causal_dir(tmp_path_factory.mktemp("tiny-gpt2"))
    model = create_optimized_text_model(str(path), task="causal-lm", use_torch_compile=False,
                                        warmup_steps=1, warmup_seq_len=16)
    return model


def _greedy(model, ids: list[int], n: int) -> str:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             do_sample=False)
    return model.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


async def _stream(client: httpx.AsyncClient, path: str, body: dict, delay: float = 0.0):
    await asyncio.sleep(delay)
    pieces, reasons, chunks = [], [], []
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            chunks.append(chunk)
            for c in chunk["choices"]:
                pieces.append(c.get("text") or c.get("delta", {}).get("content") or "")
                reasons.append(c["finish_reason"])
    return "".join(pieces), [x for x in reasons if x], chunks


def test_streamed_greedy_completions_equal_generate_while_batched(lm):
    app = create_app(lm, ServeSettings(model_id="tiny", slots=4, max_model_len=64))
    tok = lm.tokenizer
    n = [12, 20, 7, 16, 9, 14]

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            # six streams on four slots, started at different times: later ones join a running
            # decode batch and wait for a free slot
            return await asyncio.gather(*(
                _stream(client, "/v1/completions", {"prompt": p, "max_tokens": k,
                                                    "temperature": 0}, delay=0.01 * i)
                for i, (p, k) in enumerate(zip(PROMPTS, n, strict=True))))

    with running(app) as (url, _):
        results = asyncio.run(main(url))
        for (text, reasons, _), p, k in zip(results, PROMPTS, n, strict=True):
            assert text == _greedy(lm, tok(p)["input_ids"], k), p
            assert text and len(reasons) == 1 and reasons[0] in ("length", "stop")
        m = httpx.get(url + "/metrics").text
        steps = metric(m, "torchbridge_batch_size_count", queue="generate")
        singles = metric(m, "torchbridge_batch_size_bucket", queue="generate", le="1.0")
        assert steps > singles  # some decode steps ran several sequences together
        assert metric(m, "torchbridge_active_sequences") == 0
        # the same request without streaming: same text, usage counted
        r = httpx.post(url + "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 12,
                                                      "temperature": 0}, timeout=60).json()
        assert r["choices"][0]["text"] == results[0][0]
        assert r["usage"]["prompt_tokens"] == len(tok(PROMPTS[0])["input_ids"])
        assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + \
            r["usage"]["completion_tokens"]


def test_chat_stop_seed_limits_and_disconnect(lm):
    app = create_app(lm, ServeSettings(model_id="tiny", slots=2, max_model_len=64))
    engine = app.state.server.engine
    tok = lm.tokenizer
    with running(app) as (url, _):
        c = httpx.Client(base_url=url, timeout=60)
        msgs = [{"role": "system", "content": "good day"}, {"role": "user", "content": "the cat"}]
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 10,
                                                 "temperature": 0})
        assert r.status_code == 200, r.text
        ids = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
        want = _greedy(lm, ids, 10)
        assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": want}
        text, _, chunks = asyncio.run(_stream(httpx.AsyncClient(base_url=url, timeout=60),
                                              "/v1/chat/completions",
                                              {"messages": msgs, "max_tokens": 10,
                                               "temperature": 0}))
        assert text == want and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        # a stop sequence cuts the text before it and ends the request
        words = want.split()
        assert len(words) >= 3
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 10,
                                                 "temperature": 0, "stop": [words[2]]})
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        assert choice["message"]["content"] == want[:want.index(words[2])]
        # seeded sampling repeats itself
        body = {"prompt": "the cat", "max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "seed": 3}
        a, b = (c.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in "ab")
        assert a == b
        # limits: 400 naming the limit; malformed: 422 naming the field
        r = c.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 100})
        assert r.status_code == 400 and "limit of 64" in r.json()["error"]["message"]
        for body, field in (({"prompt": "x", "temperature": 3}, "temperature"),
                            ({"prompt": "x", "n": 2}, "n"), ({"max_tokens": 3}, "prompt"),
                            ({"prompt": "x", "logprobs": 2}, "logprobs")):
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 422 and field in r.json()["error"]["message"], body
        assert c.post("/v1/embeddings", json={"input": "x"}).status_code == 404
        # a client that disconnects mid-stream frees its slot
        before = engine.batcher.steps
        with httpx.Client(base_url=url, timeout=60) as short:
            with short.stream("POST", "/v1/completions",
                              json={"prompt": "the cat", "max_tokens": 60, "temperature": 0.5,
                                    "stream": True}) as resp:
                next(resp.iter_lines())
        deadline = time.monotonic() + 10
        while engine.batcher.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.batcher.active == 0
        assert engine.batcher.steps - before < 60


def test_shutdown_drains_in_flight_requests(lm):
    app = create_app(lm, ServeSettings(model_id="tiny", slots=2, max_model_len=64))
    batcher = app.state.server.engine.batcher
    step = batcher.step

    def slow_step():  # a slower model: the request is surely in flight at shutdown
        time.sleep(0.01)
        return step()

    batcher.step = slow_step
    replies = []
    with running(app) as (url, server):
        t = threading.Thread(target=lambda: replies.append(httpx.post(
            url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 40,
                                           "temperature": 0.7, "seed": 1}, timeout=60)))
        t.start()
        while not batcher.active:
            time.sleep(0.005)
        server.should_exit = True
        t.join(60)
    assert replies and replies[0].status_code == 200
    assert replies[0].json()["usage"]["completion_tokens"] >= 1
    assert replies[0].json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_no_batching_decodes_one_sequence_at_a_time(lm):
    app = create_app(lm, ServeSettings(model_id="tiny", batching=False, max_model_len=64))
    assert app.state.server.engine.batcher.slots == 1

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(
                client.post("/v1/completions", json={"prompt": p, "max_tokens": 6,
                                                     "temperature": 0}) for p in PROMPTS[:3]))

    with running(app) as (url, _):
        replies = asyncio.run(main(url))
        for r, p in zip(replies, PROMPTS, strict=False):
            assert r.json()["choices"][0]["text"] == _greedy(lm, lm.tokenizer(p)["input_ids"], 6)
        m = httpx.get(url + "/metrics").text
        steps = metric(m, "torchbridge_batch_size_count", queue="generate")
        assert steps > 0
        assert metric(m, "torchbridge_batch_size_bucket", queue="generate", le="1.0") == steps
