"""The engine loop: one thread calls ``LLMEngine.step()`` while the asyncio front end takes requests.

    while running:
        commands = inbox (all of it; wait up to 0.1 s when there is nothing to run)
        for each: add_request(...) | abort(id)        # between steps: the engine is not thread-safe
        for seq in engine.step():                     # one batched forward for every running request
            event (seq id, its new token, finish_reason)
        hand the step's events to the asyncio loop; publish the counters for /metrics

Requests and aborts enter only here, between steps, so the scheduler never sees a request appear or
vanish in the middle of one. Finished requests are forgotten and the step history is capped, so a
server that runs for days keeps flat memory.
"""
from __future__ import annotations

import time

from labkit.engine import LLMEngine
from labkit.paged import blocks_needed
from labkit.server.backend import Backend, ErrorEvent, TokenEvent
from labkit.server.protocol import APIError

HISTORY_LIMIT = 1000  # steps the engine keeps in .history while serving


class EngineBackend(Backend):
    name = "engine"

    def __init__(self, engine: LLMEngine, max_waiting: int = 256):
        super().__init__(max_waiting)
        if engine.clock != "wall":
            raise ValueError("a live server needs LLMEngine(..., clock='wall'); the virtual clock replays traces")
        if engine.history_limit is None:
            engine.history_limit = HISTORY_LIMIT
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model_config.vocab_size
        self.num_slots = engine.config.max_num_seqs

    def check(self, num_prompt_tokens: int, max_tokens: int) -> None:
        super().check(num_prompt_tokens, max_tokens)
        cfg = self.engine.config
        need = blocks_needed(num_prompt_tokens + max_tokens, cfg.block_size)
        if need > cfg.num_blocks:
            raise APIError(400, f"this request can grow to {num_prompt_tokens + max_tokens} tokens = {need} KV blocks, "
                                f"but the server's pool has {cfg.num_blocks}: it could never finish. Lower max_tokens.",
                           "max_tokens")

    def _snapshot(self) -> dict:
        stats = self.engine.stats()
        stats["num_requests_waiting"] += self.inbox.qsize()  # sent, not yet handed to the engine
        return stats

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            events = []
            for cmd in self._commands(block=not engine.has_unfinished()):
                if cmd[0] == "add":
                    _, rid, prompt_ids, params, salt = cmd
                    try:
                        engine.add_request(prompt_ids, params, request_id=rid, cache_salt=salt)
                    except ValueError as e:  # the front end checks first; this is the engine's own refusal
                        events.append((rid, ErrorEvent(str(e))))
                else:
                    rid = cmd[1]
                    if rid in engine.requests:
                        engine.abort(rid)
                        engine.forget(rid)
            if engine.has_unfinished():
                for seq in engine.step():
                    reason = seq.finish_reason.value if seq.is_finished else None
                    events.append((seq.seq_id, TokenEvent([seq.token_ids[-1]], reason, time.perf_counter())))
                    if seq.is_finished:
                        engine.forget(seq.seq_id)
            self.emit(events)
            self._stats = self._snapshot()
