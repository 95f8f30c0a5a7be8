"""What both backends share: one asyncio queue per request, a bounded number of requests, and the
hand-off between the asyncio front end and the one thread that runs the model.

    HTTP handler (asyncio)                      backend thread (the only one touching the model)
    submit() -> RequestStream ---inbox----->    ("add", id, prompt ids, params, salt)
    abort(stream)             ---inbox----->    ("abort", id)
    request queue <---call_soon_threadsafe---   [(id, TokenEvent(new ids, finish_reason, time)), ...] once a step

Nothing on the asyncio side waits for the model, and nothing in the thread touches an asyncio object
except through ``loop.call_soon_threadsafe``. ``capacity`` bounds the requests in flight (running +
waiting); past it ``submit`` answers 503 with ``Retry-After`` instead of growing a backlog without end.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import queue
import threading
import time
import traceback

from labkit.server.protocol import APIError

RETRY_AFTER_S = 1


@dataclasses.dataclass
class TokenEvent:
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | None while it runs
    t: float  # time.perf_counter() when the backend produced them


@dataclasses.dataclass
class ErrorEvent:
    message: str


class RequestStream:
    """One engine request (one choice of an HTTP request). Its events go to ``queue`` as (stream, event):
    the HTTP request's own queue, shared by its ``n`` choices. Times are ``time.perf_counter()`` seconds."""

    def __init__(self, request_id: int, num_prompt_tokens: int, queue: asyncio.Queue | None = None):
        self.request_id, self.num_prompt_tokens = request_id, num_prompt_tokens
        self.queue: asyncio.Queue = queue if queue is not None else asyncio.Queue()
        self.received_s = time.perf_counter()
        self.token_times: list[float] = []
        self.num_output_tokens = 0
        self.finish_reason: str | None = None

    def push(self, event) -> None:
        """Record an event and queue it for the handler (asyncio thread only)."""
        if isinstance(event, TokenEvent):
            self.num_output_tokens += len(event.token_ids)
            self.token_times += [event.t] * len(event.token_ids)
            if event.finish_reason is not None:
                self.finish_reason = event.finish_reason
        self.queue.put_nowait((self, event))


class Backend:
    """Base of :class:`~labkit.server.engine_loop.EngineBackend` and :class:`~labkit.server.naive.NaiveBackend`.

    Subclasses set ``name``, ``max_model_len``, ``vocab_size``, ``num_slots`` and implement ``_run`` (the
    thread's loop, reading ``self.inbox``) and ``_snapshot`` (the counters /metrics exports)."""

    name = "backend"

    def __init__(self, max_waiting: int):
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting must be an integer >= 0, got {max_waiting!r}")
        self.max_waiting = max_waiting
        self.inbox: queue.Queue = queue.Queue()
        self.streams: dict[int, RequestStream] = {}  # asyncio side only
        self._ids = itertools.count()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: str | None = None  # set if the thread died; the server then reports unhealthy
        self._stats: dict = {}

    @property
    def capacity(self) -> int:
        """Requests in flight at most: a batch slot each, plus the bounded waiting queue."""
        return self.num_slots + self.max_waiting

    # ---- asyncio side ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._stats = self._snapshot()
        self._thread = threading.Thread(target=self._guarded_run, name=f"{self.name}-loop", daemon=True)
        self._thread.start()

    def check(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Refuse (400, naming the field) a request that cannot fit the model's context."""
        limit = self.max_model_len
        if num_prompt_tokens >= limit:
            raise APIError(400, f"the prompt has {num_prompt_tokens} tokens; this model's context is {limit} tokens, "
                                "which leaves no room for an answer. Shorten the prompt.", "prompt")
        if num_prompt_tokens + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; you asked for "
                                f"{num_prompt_tokens + max_tokens} ({num_prompt_tokens} in the prompt, {max_tokens} in "
                                "the completion). Lower max_tokens or shorten the prompt.", "max_tokens")

    def submit(self, prompt_ids: list[int], params, cache_salt: str | None = None,
               queue: asyncio.Queue | None = None) -> RequestStream:
        if self.error is not None:
            raise APIError(500, f"the {self.name} loop has stopped: {self.error.splitlines()[-1]}",
                           type="internal_server_error")
        if len(self.streams) >= self.capacity:
            raise APIError(503, f"the server is at capacity ({len(self.streams)} requests in flight: {self.num_slots} "
                                f"running + {self.max_waiting} waiting); retry after {RETRY_AFTER_S} s",
                           type="server_overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})
        stream = RequestStream(next(self._ids), len(prompt_ids), queue)
        self.streams[stream.request_id] = stream
        self.inbox.put(("add", stream.request_id, prompt_ids, params, cache_salt))
        return stream

    def abort(self, stream: RequestStream) -> None:
        """The client went away (or a stop string matched, or the request timed out): free its slot now."""
        if self.streams.pop(stream.request_id, None) is not None:
            self.inbox.put(("abort", stream.request_id))

    def stats(self) -> dict:
        """The latest counters the thread published (read by /metrics; never blocks on the model)."""
        return {**self._stats, "num_requests_in_flight": len(self.streams)}

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _deliver(self, events: list[tuple[int, TokenEvent | ErrorEvent]]) -> None:
        for rid, event in events:
            stream = self.streams.get(rid)
            if stream is None:  # aborted meanwhile
                continue
            stream.push(event)
            if isinstance(event, ErrorEvent) or event.finish_reason is not None:
                del self.streams[rid]

    # ---- thread side ----------------------------------------------------------------------------
    def emit(self, events: list[tuple[int, TokenEvent | ErrorEvent]]) -> None:
        """Hand a step's events to the asyncio loop (called from the backend thread)."""
        if events:
            self.loop.call_soon_threadsafe(self._deliver, events)

    def _guarded_run(self) -> None:
        try:
            self._run()
        except Exception:  # the model or the engine failed: every waiting client hears it, /health says so
            self.error = traceback.format_exc()
            print(self.error, flush=True)
            self.loop.call_soon_threadsafe(self._fail_all, self.error.strip().splitlines()[-1])

    def _fail_all(self, message: str) -> None:
        for stream in self.streams.values():
            stream.push(ErrorEvent(f"the {self.name} loop stopped: {message}"))
        self.streams.clear()

    def _commands(self, block: bool) -> list[tuple]:
        """Everything in the inbox; waits up to 0.1 s for the first one if ``block`` (nothing to run)."""
        cmds = []
        try:
            if block:
                cmds.append(self.inbox.get(timeout=0.1))
            while True:
                cmds.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return cmds

    def _run(self) -> None:
        raise NotImplementedError

    def _snapshot(self) -> dict:
        raise NotImplementedError
