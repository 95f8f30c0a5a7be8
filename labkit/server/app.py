"""The HTTP front end: FastAPI routes over a backend (the engine loop, or the naive one-at-a-time server).

    POST /v1/completions, /v1/chat/completions   generate; ``"stream": true`` answers with server-sent events
    GET  /v1/models                              the one model this server serves
    GET  /health                                 200 while serving; 503 while draining; 500 if the loop died
    GET  /metrics                                Prometheus text (labkit.server.metrics)

One request, start to end::

    authenticate (tenant, salt) -> parse + check the body (400 names the field) -> tokenize (chat: the model's
    template) -> check it fits the context -> submit one RequestStream per choice (503 + Retry-After past
    capacity) -> read the stream: detokenize, stop strings, SSE chunks -> metrics

A client that goes away mid-answer, a stop string, and the request timeout all end the same way: the
request is aborted in the engine, between two steps, and its KV blocks return to the pool. On SIGTERM the
server stops taking requests (503; the listening socket closes) and lets the ones in flight finish
(``labkit.serve``).
"""
from __future__ import annotations

import asyncio
import contextlib
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from labkit.server import protocol
from labkit.server.backend import Backend, ErrorEvent, RequestStream
from labkit.server.detokenizer import IncrementalDetokenizer
from labkit.server.metrics import CONTENT_TYPE, ServerMetrics
from labkit.server.protocol import APIError
from labkit.server.tenancy import Tenants

NO_CHAT_TEMPLATE = ("this model has no chat template (its tokenizer names none), so the server cannot lay out a "
                    "conversation the way the model was trained; send a plain prompt to /v1/completions instead")


class _Failed(Exception):
    """The backend reported an error for one of the request's choices."""


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(backend: Backend, tokenizer, model_name: str, tenants: Tenants | None = None,
               request_timeout: float = 600.0) -> FastAPI:
    """The server's ASGI app. The backend's thread starts with the app (lifespan) and stops with it."""
    tenants = tenants if tenants is not None else Tenants()
    if not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout!r}")
    metrics = ServerMetrics(backend, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        backend.start(asyncio.get_running_loop())
        yield
        backend.shutdown()

    app = FastAPI(title="labkit server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False
    app.state.backend, app.state.metrics, app.state.tenants = backend, metrics, tenants

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # unknown route, wrong method
        metrics.error(exc.status_code)
        what = {404: f"no route {request.method} {request.url.path}; this server has POST /v1/completions, "
                     "POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(APIError(exc.status_code, what, type="invalid_request_error"))

    @app.get("/health")
    async def health():
        if backend.error is not None:
            return JSONResponse({"status": "error", "error": backend.error.strip().splitlines()[-1]}, status_code=500)
        if app.state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            tenants.authenticate(request.headers.get("authorization"))
        except APIError as e:
            metrics.error(e.status)
            return error_response(e)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": protocol.now_s(),
                                             "owned_by": "labkit", "max_model_len": backend.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, chat=True)

    # ---- one request ---------------------------------------------------------------------------
    def tokenize(req: protocol.GenerationRequest) -> list[list[int]]:
        out = []
        for p in req.prompts:
            if req.chat:
                if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
                    raise APIError(400, NO_CHAT_TEMPLATE, "messages")
                try:
                    ids = tokenizer.apply_chat_template(p, add_generation_prompt=True)
                except ValueError as e:  # the template refused the conversation (raise_exception in Jinja)
                    raise APIError(400, str(e), "messages") from None
                ids = tokenizer.encode(ids) if isinstance(ids, str) else list(ids)
            elif isinstance(p, str):
                ids = tokenizer.encode(p)
            else:
                bad = [t for t in p if not 0 <= t < backend.vocab_size]
                if bad:
                    raise APIError(400, f"prompt token id {bad[0]} is not in this model's vocabulary "
                                        f"[0, {backend.vocab_size})", "prompt")
                ids = list(p)
            if not ids:
                raise APIError(400, "the prompt encodes to no tokens; a request needs at least one", "prompt")
            out.append(ids)
        return out

    def submit(req: protocol.GenerationRequest, prompt_ids: list[list[int]], salt) -> list[RequestStream]:
        streams, queue = [], asyncio.Queue()  # one queue for the HTTP request, whatever its n
        try:
            for ids in prompt_ids:
                max_tokens = req.max_tokens if req.max_tokens is not None else backend.max_model_len - len(ids)
                backend.check(len(ids), max_tokens)
                for i in range(req.n):
                    streams.append(backend.submit(ids, req.sampling_params(max_tokens, i), salt, queue))
        except APIError:
            for s in streams:
                backend.abort(s)
            raise
        return streams

    async def _generate(request: Request, chat: bool):
        try:
            if app.state.draining:
                raise APIError(503, "the server is shutting down and takes no new requests",
                               type="server_shutting_down",
                               headers={"Retry-After": "1", "Connection": "close"})
            tenant = tenants.authenticate(request.headers.get("authorization"))
            req = protocol.parse_request(protocol.parse_json(await request.body()), chat)
            if req.model != model_name:
                raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{model_name}' "
                                    "(GET /v1/models)", "model", code="model_not_found")
            prompt_ids = tokenize(req)
            streams = submit(req, prompt_ids, tenant.cache_salt)
        except APIError as e:
            metrics.error(e.status)
            return error_response(e)
        deadline = time.perf_counter() + request_timeout
        num_prompt_tokens = sum(len(p) for p in prompt_ids)
        if req.stream:
            return StreamingResponse(_sse(req, streams, deadline, num_prompt_tokens), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _collect(request, req, streams, deadline, num_prompt_tokens)

    async def _events(streams: list[RequestStream], stop: list[str], deadline: float):
        """(choice index, text delta, finish_reason) in arrival order across the choices; aborts what is left
        when the consumer stops (client gone, timeout). One timer per request, not one per token."""
        detoks = [IncrementalDetokenizer(tokenizer, stop) for _ in streams]
        index = {s.request_id: i for i, s in enumerate(streams)}
        queue = streams[0].queue
        loop = asyncio.get_running_loop()
        timer = loop.call_at(loop.time() + max(0.0, deadline - time.perf_counter()), queue.put_nowait, (None, None))
        open_ = set(range(len(streams)))
        try:
            while open_:
                stream, ev = await queue.get()
                if stream is None:
                    raise TimeoutError
                i = index[stream.request_id]
                if i not in open_:  # a late event of a choice already ended by a stop string
                    continue
                if isinstance(ev, ErrorEvent):
                    raise _Failed(ev.message)
                text = detoks[i].add(ev.token_ids)
                finish = ev.finish_reason
                if detoks[i].stopped:  # a stop string: the answer ends here, the engine stops generating
                    finish = "stop"
                    backend.abort(stream)
                    stream.finish_reason = "stop"
                if finish is not None:
                    text += detoks[i].flush()
                    open_.discard(i)
                yield i, text, finish
        finally:
            timer.cancel()
            for s in streams:
                backend.abort(s)  # no-op for the finished ones
                metrics.observe(s)

    async def _sse(req, streams, deadline, num_prompt_tokens):
        rid, created = protocol.new_id(req.chat), protocol.now_s()
        first = [True] * len(streams)
        try:
            async with contextlib.aclosing(_events(streams, req.stop, deadline)) as events:
                async for i, text, finish in events:
                    ch = protocol.choice(i, text, finish, req.chat, delta=True, first=first[i])
                    first[i] = False
                    yield protocol.sse(protocol.response(rid, req.model, created, [ch], req.chat, chunk=True))
            if req.include_usage:
                u = protocol.usage(num_prompt_tokens, sum(s.num_output_tokens for s in streams))
                yield protocol.sse(protocol.response(rid, req.model, created, [], req.chat, chunk=True, usage_=u))
        except TimeoutError:
            metrics.error(504)
            yield protocol.sse(_timeout_error(request_timeout).body())
        except _Failed as e:
            metrics.error(500)
            yield protocol.sse(APIError(500, str(e), type="internal_server_error").body())
        yield protocol.sse("[DONE]")

    async def _collect(request, req, streams, deadline, num_prompt_tokens):
        texts, finishes = [""] * len(streams), [None] * len(streams)

        async def gather():
            async with contextlib.aclosing(_events(streams, req.stop, deadline)) as events:
                async for i, text, finish in events:
                    texts[i] += text
                    finishes[i] = finish

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.create_task(gather()), asyncio.create_task(disconnected())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client went away: stop its work now (work's finally aborts it)
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                return Response(status_code=499)
            work.result()
        except TimeoutError:
            metrics.error(504)
            return error_response(_timeout_error(request_timeout))
        except _Failed as e:
            metrics.error(500)
            return error_response(APIError(500, str(e), type="internal_server_error"))
        finally:
            gone.cancel()
        choices = [protocol.choice(i, texts[i], finishes[i], req.chat, delta=False) for i in range(len(streams))]
        u = protocol.usage(num_prompt_tokens, sum(s.num_output_tokens for s in streams))
        return protocol.response(protocol.new_id(req.chat), req.model, protocol.now_s(), choices, req.chat,
                                 chunk=False, usage_=u)

    return app


def _timeout_error(seconds: float) -> APIError:
    return APIError(504, f"the request ran past the server's request timeout of {seconds:g} s and was stopped; ask "
                         "for fewer max_tokens, or retry when the server is less busy", type="timeout")
