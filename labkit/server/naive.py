"""The naive server: one request at a time through ``labkit.generate.generate()``.

This is the demo that falls over after two users. A web handler holding a global lock around
``model.generate(...)`` serves requests strictly one after another; here one worker thread takes them
from the inbox in arrival order (the lock, made fair). Each request gets a KV cache of its own
(``ContiguousCache``), so it is not slow per token: it is slow for everyone behind it, whose time to
first token is the sum of every answer ahead of them.
"""
from __future__ import annotations

import collections
import time

from labkit.generate import generate
from labkit.kv_cache import ContiguousCache
from labkit.server.backend import Backend, ErrorEvent, TokenEvent


def burst_ttft(num_users: int, service_s: float, first_token_s: float) -> list[float]:
    """TTFT of each of ``num_users`` requests that reach a one-at-a-time server together, each answer taking
    ``service_s`` and its first token ``first_token_s`` after it starts: the k-th waits for k answers.
    The last user's TTFT grows linearly with the number of users: the demo that fell over."""
    return [k * service_s + first_token_s for k in range(num_users)]


class _Aborted(Exception):
    pass


class _Stopped(Exception):
    pass


class NaiveBackend(Backend):
    name = "naive"

    def __init__(self, model, eos_token_ids=(), max_waiting: int = 256):
        super().__init__(max_waiting)
        self.model = model
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = model.config.max_position_embeddings
        self.vocab_size = model.config.vocab_size
        self.num_slots = 1
        self.jobs: collections.deque = collections.deque()
        self.aborted: set[int] = set()
        self.busy = False
        self.num_steps = 0

    def _snapshot(self) -> dict:
        return {"num_requests_running": int(self.busy), "num_requests_waiting": len(self.jobs) + self.inbox.qsize(),
                "num_requests_swapped": 0, "kv_blocks_used": 0, "kv_blocks_free": 0, "kv_blocks_total": 0,
                "prefix_cache_queries_tokens": 0, "prefix_cache_hits_tokens": 0, "num_preemptions": 0,
                "num_steps": self.num_steps}

    def _take(self, cmds) -> None:
        for cmd in cmds:
            if cmd[0] == "add":
                self.jobs.append(cmd[1:])
            else:
                self.aborted.add(cmd[1])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take(self._commands(block=not self.jobs))
            self._stats = self._snapshot()
            if not self.jobs:
                continue
            rid, prompt_ids, params, _salt = self.jobs.popleft()  # one tenant's cache: there is none to salt
            if rid in self.aborted:
                self.aborted.discard(rid)
                continue
            self.busy = True
            self._stats = self._snapshot()
            self._serve(rid, prompt_ids, params)
            self.busy = False
            self.aborted.discard(rid)

    def _serve(self, rid: int, prompt_ids: list[int], params) -> None:
        eos = () if params.ignore_eos else self.eos_token_ids
        count = [0]

        def on_token(tok: int) -> None:
            count[0] += 1
            self.num_steps += 1
            self._take(self._commands(block=False))  # aborts arrive while we generate
            if rid in self.aborted:
                raise _Aborted
            done = tok in eos or tok in params.stop_token_ids
            reason = "stop" if done else ("length" if count[0] >= params.max_tokens else None)
            self.emit([(rid, TokenEvent([tok], reason, time.perf_counter()))])
            self._stats = self._snapshot()
            if done:
                raise _Stopped

        cache = ContiguousCache(self.model.config, 1, len(prompt_ids) + params.max_tokens,
                                dtype=next(self.model.parameters()).dtype, device=next(self.model.parameters()).device)
        try:
            generate(self.model, prompt_ids, params.max_tokens, cache=cache, temperature=params.temperature,
                     top_k=params.top_k, top_p=params.top_p, seed=params.seed, on_token=on_token)
        except (_Aborted, _Stopped):
            pass
        except (ValueError, FloatingPointError) as e:  # this request's own failure; the server goes on
            self.emit([(rid, ErrorEvent(str(e)))])
