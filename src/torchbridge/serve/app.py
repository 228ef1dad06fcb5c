"""The ASGI app: OpenAI-shaped endpoints over one optimized model (FastAPI).

(No `from __future__ import annotations` here: FastAPI reads the handlers' annotations, and
`Request` is imported inside `create_app`, where postponed names would not resolve.)

Which endpoints answer depends on the model's task: /v1/embeddings for encoders, /v1/classify
for sequence / token classifiers, /v1/completions and /v1/chat/completions for causal LMs; the
others answer 404 naming the task served. Errors use OpenAI's body shape
`{"error": {"message", "type", "param", "code"}}` (serve/errors.py).
"""


import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np

from torchbridge.serve.batching import EncoderBatcher, QueueFull
from torchbridge.serve.engine import Chunk, GenerationEngine, Stream
from torchbridge.serve.errors import APIError, error_body, shed, validation_error_body
from torchbridge.serve.metrics import MetricsMiddleware, ServeMetrics
from torchbridge.serve.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from torchbridge.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]

ENCODER_TASKS = ("feature-extraction", "sequence-classification", "token-classification",
                 "masked-lm")
CLASSIFY_TASKS = ("sequence-classification", "token-classification")
# How often a non-streaming handler looks whether its client is still there.
DISCONNECT_POLL_S = 0.25


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"torchbridge serve needs {module}: pip install torchbridge[serve]") from e


class _Server:
    """What the handlers share: model, tokenizer, batchers, metrics."""

    def __init__(self, model: Any, settings: ServeSettings) -> None:
        self.model, self.settings = model, settings
        self.task = model.task
        self.tokenizer = model.tokenizer
        self.metrics = ServeMetrics()
        self.created = int(time.time())
        self.embedder: EncoderBatcher | None = None
        self.classifier: EncoderBatcher | None = None
        self.engine: GenerationEngine | None = None
        per_call = None if settings.batching else 1
        if self.task == "causal-lm":
            self.engine = GenerationEngine(
                model.model, self.tokenizer, slots=settings.slots if settings.batching else 1,
                max_length=settings.max_model_len, max_queue=settings.max_queue,
                metrics=self.metrics)
            self.limit = self.engine.max_length
        elif self.task in ENCODER_TASKS:
            from torchbridge.data.inference import encode, predict
            from torchbridge.data.texts import max_tokens

            self.limit = max_tokens(model, self.tokenizer)
            budget = settings.max_batch_tokens
            batching = dict(max_batch_tokens=budget, max_wait_ms=settings.max_wait_ms,
                            max_queue=settings.max_queue, max_batch_requests=per_call,
                            metrics=self.metrics)
            self.embedder = EncoderBatcher(
                lambda texts: encode(model, texts, max_batch_tokens=budget,
                                     normalize=settings.normalize, output="numpy"),
                name="embeddings", **batching)
            if self.task in CLASSIFY_TASKS:
                self.classifier = EncoderBatcher(
                    lambda texts: predict(model, texts, max_batch_tokens=budget),
                    name="classify", **batching)
        else:
            raise ValueError(f"torchbridge serve has no endpoint for task {self.task!r}; served "
                             f"tasks: causal-lm, {', '.join(ENCODER_TASKS)}")

    def workers(self) -> list[Any]:
        return [w for w in (self.embedder, self.classifier, self.engine) if w is not None]

    # -- checks shared by the handlers --------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_id:
            raise APIError(404, f"model {name!r} is not served here; this server serves "
                                f"{self.settings.model_id!r}", param="model",
                           type_="not_found_error")

    def need(self, worker: Any, endpoint: str, wants: str) -> Any:
        if worker is None:
            raise APIError(404, f"{endpoint} needs {wants}; this server's model "
                                f"{self.settings.model_id!r} is a {self.task} model",
                           type_="not_found_error")
        return worker

    def count_tokens(self, texts: list[str], param: str) -> int:
        """Tokens of each text against the model's limit: 400 naming the text and the limit."""
        lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        for i, n in enumerate(lengths):
            if n > self.limit:
                where = param if len(texts) == 1 else f"{param}[{i}]"
                raise APIError(400, f"{where} has {n} tokens, more than the model's limit of "
                                    f"{self.limit} tokens", param=param,
                               type_="context_length_exceeded")
        return sum(lengths)


async def _until_disconnect(request: Any, task: asyncio.Future, on_gone: Any = None) -> Any:
    """Await `task`, giving up (and calling `on_gone`) when the client disconnects."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            if on_gone is not None:
                on_gone()
            raise asyncio.CancelledError


def create_app(model: Any, settings: ServeSettings) -> Any:
    """A FastAPI app serving `model` (an OptimizedTextModel with a tokenizer)."""
    fastapi = _require("fastapi")
    from fastapi import Depends, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    server = _Server(model, settings)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        for w in server.workers():
            w.start()
        yield
        # uvicorn has already waited for in-flight requests; finish what is queued, then stop
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: [w.close(drain=True) for w in server.workers()])

    app = fastapi.FastAPI(title="torchbridge serve", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(MetricsMiddleware, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(error_body(err.message, err.type, err.param), status_code=err.status,
                            headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(err.errors()), status_code=422)

    async def auth(request: Request) -> None:  # async: a sync dependency costs a thread hop
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or token != settings.api_key:
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           type_="authentication_error")

    guarded = [Depends(auth)]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": settings.model_id, "task": server.task,
                "queue_depth": sum(w.depth for w in server.workers())}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = server.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return {"object": "list", "data": [{"id": settings.model_id, "object": "model",
                                            "created": server.created, "owned_by": "torchbridge",
                                            "task": server.task}]}

    async def _batched(body: Any, request: Request, batcher: Any) -> tuple[list, int]:
        """One request's texts through the encoder queue: validated, counted, shed when full."""
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        n_tokens = server.count_tokens(texts, "input")
        try:
            task = asyncio.ensure_future(batcher.submit(texts, n_tokens))
            results = await _until_disconnect(request, task)
        except QueueFull as err:
            raise shed(err) from None
        server.metrics.count_tokens("input", n_tokens)
        return results, n_tokens

    @app.post("/v1/embeddings", dependencies=guarded)
    async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
        server.check_model(body.model)
        batcher = server.need(server.embedder, "/v1/embeddings", "an encoder model")
        vectors, n_tokens = await _batched(body, request, batcher)
        data = []
        for i, v in enumerate(vectors):
            v = np.asarray(v, dtype=np.float32)
            emb: Any = base64.b64encode(v.tobytes()).decode() \
                if body.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        # a JSONResponse skips FastAPI's recursive jsonable_encoder over every float
        return JSONResponse({"object": "list", "data": data, "model": settings.model_id,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    @app.post("/v1/classify", dependencies=guarded)
    async def classify(body: ClassifyRequest, request: Request) -> dict:
        server.check_model(body.model)
        batcher = server.need(server.classifier, "/v1/classify", "a classification model")
        results, n_tokens = await _batched(body, request, batcher)
        key = "entities" if server.task == "token-classification" else "result"
        data = []
        for i, r in enumerate(results):
            item = {"index": i, key: r} if key == "entities" else {"index": i, **r}
            data.append(item)
        return {"object": "list", "data": data, "model": settings.model_id,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    def sampling(body: Any) -> dict[str, Any]:
        if body.temperature == 0:
            return {"do_sample": False}
        # OpenAI has no top-k: turn off HF's default of 50 so top_p alone decides
        return {"do_sample": True, "temperature": body.temperature, "top_p": body.top_p,
                "top_k": 0}

    def submit(engine: GenerationEngine, ids: list[int], max_tokens: int | None,
               body: Any) -> Stream:
        room = engine.max_length - len(ids) + 1
        if room < 1:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server's limit is "
                                f"{engine.max_length} tokens (prompt + max_tokens)",
                           param="prompt", type_="context_length_exceeded")
        n = room if max_tokens is None else max_tokens
        if n > room:
            raise APIError(400, f"prompt of {len(ids)} tokens + max_tokens {n} exceeds this "
                                f"server's limit of {engine.max_length} tokens; fix: "
                                f"max_tokens <= {room}", param="max_tokens",
                           type_="context_length_exceeded")
        try:
            return engine.submit(ids, n, sampling(body), seed=body.seed, stops=body.stops())
        except QueueFull as err:
            raise shed(err) from None

    async def collect(stream: Stream, request: Request) -> tuple[str, str]:
        async def read() -> tuple[str, str]:
            text = []
            while True:
                chunk: Chunk = await stream.chunks.get()
                text.append(chunk.text)
                if chunk.finish_reason is not None:
                    if chunk.error:
                        raise APIError(500, chunk.error, type_="server_error")
                    return "".join(text), chunk.finish_reason

        return await _until_disconnect(request, asyncio.ensure_future(read()), stream.cancel)

    def usage(streams: list[Stream]) -> dict[str, int]:
        p = sum(s.prompt_tokens for s in streams)
        c = sum(s.completion_tokens for s in streams)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def event_stream(stream: Stream, make_chunk: Any, rid: str, include_usage: bool,
                     first: Any = None) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                if first is not None:
                    yield sse(first)
                while True:
                    chunk: Chunk = await stream.chunks.get()
                    if chunk.error:
                        yield sse(error_body(chunk.error, "server_error"))
                        break
                    if chunk.text or chunk.finish_reason:
                        yield sse(make_chunk(chunk.text, chunk.finish_reason))
                    if chunk.finish_reason is not None:
                        break
                if include_usage:
                    yield sse({**make_chunk(None, None), "choices": [],
                               "usage": usage([stream])})
                yield "data: [DONE]\n\n"
            finally:
                stream.cancel()  # no-op when finished; frees the slot if the client went away

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        server.check_model(body.model)
        engine = server.need(server.engine, "/v1/completions", "a causal LM")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if body.stream and len(prompts) > 1:
            raise APIError(400, "stream=true takes one prompt; send one request per prompt",
                           param="prompt")
        ids = [server.tokenizer(p)["input_ids"] for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams = []
        try:
            for x in ids:
                streams.append(submit(engine, x, body.max_tokens, body))
        except APIError:
            for s in streams:
                s.cancel()
            raise

        def chunk(text: str | None, reason: str | None, index: int = 0) -> dict:
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": settings.model_id,
                    "choices": [{"index": index, "text": text or "", "logprobs": None,
                                 "finish_reason": reason}]}

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return event_stream(streams[0], chunk, rid, include)
        try:
            results = await asyncio.gather(*(collect(s, request) for s in streams))
        finally:
            for s in streams:
                s.cancel()
        choices = [chunk(text, reason, i)["choices"][0]
                   for i, (text, reason) in enumerate(results)]
        return {**chunk(None, None), "choices": choices, "usage": usage(streams)}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        server.check_model(body.model)
        engine = server.need(server.engine, "/v1/chat/completions", "a causal LM")
        if not getattr(server.tokenizer, "chat_template", None):
            raise APIError(400, f"model {settings.model_id!r} has no chat template in its "
                                "tokenizer; use /v1/completions", param="messages")
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        text = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    tokenize=False)
        # the template writes the special tokens (BOS, role markers) itself
        ids = server.tokenizer(text, add_special_tokens=False)["input_ids"]
        stream = submit(engine, ids, body.max_completion_tokens or body.max_tokens, body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, reason: str | None) -> dict:
            delta = {} if text is None and reason is None else \
                ({"content": text} if text else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": settings.model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            first = chunk(None, None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return event_stream(stream, chunk, rid, include, first=first)
        try:
            text, reason = await collect(stream, request)
        finally:
            stream.cancel()
        return {"id": rid, "object": "chat.completion", "created": created,
                "model": settings.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": reason, "logprobs": None}],
                "usage": usage([stream])}

    return app
