"""Where every slot of the engine's KV pool was, step by step: the accounting behind the memory figures of
notebooks 02 and 04 (``labkit.memory_map``) and ``python -m labkit.fragmentation``.

    recorder = PoolRecorder(engine)   # watches every step, as the step's forward sees the pool
    engine.run()
    history = recorder.finish()       # a PoolHistory: slots per category and step, who held which blocks

    replay(trace, config)             a whole trace through the engine on the recorded GPU cost model

A slot is in one of the vLLM paper's categories (Kwon et al., SOSP 2023, Fig. 2)::

    | used: holds a token's K/V | reserved: will hold one later | internal: held, never used |  a request's blocks
    | external: free, in a gap too small for the waiting request | free |                       the rest

"reserved" and "internal" depend on the future (how far the request will grow), so the counts are made
when the run is over, from the slots each request filled by its end. Only the contiguous allocator has
external fragmentation: a paged pool's free blocks serve any request.
"""
from __future__ import annotations

import bisect
import dataclasses

import numpy as np

CATEGORIES = ("used", "reserved", "internal", "external", "free")


@dataclasses.dataclass
class Residency:
    """One stay of a request in the pool: from the step it got blocks to the last step it held them
    (it ends when the request finishes, or when it is preempted and its blocks are freed)."""

    req_id: int
    admit_step: int
    block_ids: list[int] = dataclasses.field(default_factory=list)  # its block table, in order
    taken_at: list[int] = dataclasses.field(default_factory=list)  # the step each of those blocks was taken
    tokens: list[int] = dataclasses.field(default_factory=list)  # slots it filled at each step from admit_step
    end_step: int | None = None
    preempted: bool = False
    final_len: int = 0  # slots the request fills by its end (set by PoolRecorder.finish)

    def tokens_at(self, step: int) -> int:
        return self.tokens[step - self.admit_step]

    def blocks_at(self, step: int) -> list[int]:
        """Its block table at ``step`` (the blocks taken so far)."""
        return self.block_ids[:bisect.bisect_right(self.taken_at, step)]


@dataclasses.dataclass
class PoolHistory:
    """What happened to the pool over a run: counts per step (arrays of length num_steps)."""

    pool_name: str
    allocation: str
    num_blocks: int
    block_size: int
    counts: dict[str, np.ndarray]  # CATEGORIES -> slots per step; they sum to capacity
    waiting: np.ndarray  # requests waiting (queued or preempted) after each step's admission
    running: np.ndarray  # requests holding blocks during each step
    head_need: np.ndarray  # slots the first waiting request needs in one gap (contiguous; 0: none waits)
    step_end_s: np.ndarray  # the engine's clock at the end of each step
    residencies: list[Residency]
    num_preemptions: int
    refused: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (request id, why)

    @property
    def capacity(self) -> int:
        """Token slots in the pool."""
        return self.num_blocks * self.block_size

    @property
    def num_steps(self) -> int:
        return len(self.waiting)

    @property
    def saturated(self) -> np.ndarray:
        """Steps at which some request was kept waiting: the pool, not the arrivals, was the limit."""
        return self.waiting > 0

    def shares(self, window: str = "saturated") -> dict[str, float]:
        """Mean share of the pool in each category over ``window``: "saturated" steps (the vLLM paper
        measures a loaded server) or "busy" steps (any request in the pool). A run that never saturated
        is averaged over its busy steps (``fragmentation.report`` says so)."""
        if window not in ("saturated", "busy"):
            raise ValueError(f"window must be 'saturated' or 'busy', got {window!r}")
        mask = self.saturated if window == "saturated" else self.running > 0
        if not mask.any():
            mask = self.running > 0
        return {c: float(self.counts[c][mask].mean() / self.capacity) for c in CATEGORIES}

    def useful_share(self, window: str = "saturated") -> float:
        return self.shares(window)["used"]


class PoolRecorder:
    """Watches an :class:`~labkit.engine.LLMEngine`: after each step's forward (before finished requests give
    their blocks back) it notes who holds which blocks and how many slots each fills."""

    def __init__(self, engine):
        if engine.history:
            raise ValueError("attach the PoolRecorder before the engine's first step, so it sees every block")
        self.engine = engine
        self.open: dict = {}  # request id -> its current Residency
        self.residencies: list[Residency] = []
        self.waiting, self.running, self.head_need, self.external, self.end_s = [], [], [], [], []
        self.num_preemptions = 0
        engine.observers.append(self)

    def __call__(self, engine, out) -> None:
        bm, sched = engine.block_manager, engine.scheduler
        t = len(self.waiting)
        holders = bm.bm.seqs
        for sid, blocks in holders.items():
            table = blocks.block_table
            res = self.open.get(sid)
            known = res.block_ids if res is not None else None
            if res is not None and (len(table) < len(known) or table[0] != known[0]
                                    or table[len(known) - 1] != known[-1]):
                self._close(sid, t - 1)  # its blocks changed under it: a new stay
                res = None
            if res is None:
                res = Residency(sid, t)
                self.open[sid] = res
                self.residencies.append(res)
            if len(table) > len(res.block_ids):
                new = table[len(res.block_ids):]
                res.block_ids.extend(new)
                res.taken_at.extend([t] * len(new))
            res.tokens.append(bm.num_live_tokens(engine.requests[sid]))
        for sid in [s for s in self.open if s not in holders]:
            self._close(sid, t - 1)
        head = sched.waiting[0] if sched.waiting else None
        need = bm.blocks_to_admit(head, head.num_tokens) if head is not None else 0
        external = 0
        if head is not None and bm.allocation == "contiguous":
            external = sum(n for _, n in bm.free_runs() if n < need) * bm.block_size
        self.waiting.append(len(sched.waiting) + len(sched.swapped))
        self.running.append(len(holders))
        self.head_need.append(need * bm.block_size if bm.allocation == "contiguous" else 0)
        self.external.append(external)
        self.end_s.append(engine.now)
        self.num_preemptions += len(out.preempted)

    def _close(self, sid, end_step: int) -> None:
        res = self.open.pop(sid)
        res.end_step = end_step
        res.preempted = not self.engine.requests[sid].is_finished

    def finish(self, refused: list[tuple[int, str]] | None = None) -> PoolHistory:
        """The counts, once the run is over (call it once)."""
        if self in self.engine.observers:
            self.engine.observers.remove(self)
        T = len(self.waiting)
        for sid in list(self.open):
            self._close(sid, T - 1)
        final: dict = {}
        for res in self.residencies:
            final[res.req_id] = max(final.get(res.req_id, 0), max(res.tokens))
        bm = self.engine.block_manager
        bs = bm.block_size
        used, reserved, internal = (np.zeros(T, dtype=np.int64) for _ in range(3))
        for res in self.residencies:
            res.final_len = final[res.req_id]
            steps = np.arange(res.admit_step, res.end_step + 1)
            taken = np.asarray(res.taken_at)
            alloc = np.searchsorted(taken, steps, side="right") * bs  # slots held at each step
            tok = np.asarray(res.tokens, dtype=np.int64)
            fill = np.minimum(alloc, res.final_len)  # the part of its blocks it will ever fill
            used[steps] += tok
            reserved[steps] += fill - tok
            internal[steps] += alloc - fill
        external = np.asarray(self.external, dtype=np.int64)
        capacity = bm.num_blocks * bs
        counts = {"used": used, "reserved": reserved, "internal": internal, "external": external,
                  "free": capacity - used - reserved - internal - external}
        cfg = self.engine.config
        name = f"contiguous ({cfg.reserve})" if cfg.allocation == "contiguous" else f"paged (block {bs})"
        return PoolHistory(pool_name=name, allocation=cfg.allocation, num_blocks=bm.num_blocks, block_size=bs,
                           counts=counts, waiting=np.asarray(self.waiting), running=np.asarray(self.running),
                           head_need=np.asarray(self.head_need), step_end_s=np.asarray(self.end_s),
                           residencies=self.residencies, num_preemptions=self.num_preemptions,
                           refused=list(refused or []))


def replay(trace, config, *, cost=None, model_config=None, client_cap: bool = True, seed: int = 0,
           max_steps: int = 1_000_000) -> PoolHistory:
    """Serve ``trace`` (``labkit.traces``) with an engine of ``config`` on the recorded GPU cost model
    (:class:`labkit.engine.SimulatedRunner`: Llama-3-8B's step times on the roofline's GPU) and record the pool.

    Each request ends at its trace output length. ``client_cap=True``: its ``max_tokens`` is the client's
    cap, and it ends earlier with an EOS, so a contiguous reservation of prompt + max_tokens really is too
    big; the "oracle" reservation is given the true length. A request the engine refuses (longer than the
    pool could ever hold) is recorded in ``refused`` and not served.
    """
    from labkit.engine import LLMEngine, SimulatedRunner
    from labkit.step_cost import StepCostModel, recorded_model_config
    from labkit.traces import requests_from_trace

    cost = StepCostModel.from_roofline() if cost is None else cost
    mc = recorded_model_config(max_len=trace.max_len) if model_config is None else model_config
    eos = 0 if mc.eos_token_id is None else int(mc.eos_token_id if isinstance(mc.eos_token_id, int)
                                                  else mc.eos_token_id[0])
    reqs = requests_from_trace(trace, mc.vocab_size, seed=seed, client_cap=client_cap)
    lens = {r.request_id: r.output_len for r in reqs}
    runner = SimulatedRunner(cost, mc.vocab_size, output_lens=lens, eos_token_id=eos)
    engine = LLMEngine(config=config, runner=runner, model_config=mc, eos_token_ids=(eos,))
    # the oracle knows the future: the prompt and every output token but the last (returned, never fed back)
    engine.block_manager.oracle = lambda seq: seq.num_prompt_tokens + lens[seq.seq_id] - 1
    recorder = PoolRecorder(engine)
    refused = []
    for r in reqs:
        try:
            engine.add_request(list(r.prompt_token_ids), r.params, request_id=r.request_id, arrival_s=r.arrival_s)
        except ValueError as e:
            refused.append((r.request_id, str(e)))
    engine.run(max_steps=max_steps)
    return recorder.finish(refused)
