"""A fixed-size KV-cache pool, measured in token slots, under two ways of handing it out.

One slot holds the K and V of one token in every layer (``config.kv_bytes_per_token()`` bytes).
The pool has ``num_slots`` of them; requests come and go; the question is how many slots hold
a real token at any moment.

    contiguous  each admitted request gets one unbroken address range, reserved up front and
                placed first-fit (HF Transformers / FasterTransformer / Orca style). How much to
                reserve, ``reserve=``:
                  "max_len"          the model's context length, whatever the request (Orca "Max")
                  "max_new_tokens"   prompt + the client's max_new_tokens cap
                  "oracle"           prompt + the true output length (no real server knows it;
                                     the vLLM paper's "Oracle" bound)
    paged       blocks of ``block_size`` slots from labkit.paged's BlockManager, one more block
                whenever a request's last block is full; any free block serves any request. When
                the blocks run out, the newest request is preempted (freed, recomputed later).

Where a slot can be (the vLLM paper's Fig. 2 categories)::

    | used: holds a token | reserved: will hold one later | internal: held, never used |   request's range
    | external: free, but in a gap too small for the waiting request | free |             the rest

``simulate(trace, pool)`` replays a trace step by step (one step = one decode iteration of every
running request, iteration-level scheduling as in Orca) and records these numbers at every step.
"""
from __future__ import annotations

import bisect
import dataclasses
from collections import deque

import numpy as np

from labkit.paged import BlockManager
from labkit.traces import Request, Trace

CATEGORIES = ("used", "reserved", "internal", "external", "free")
RESERVE_POLICIES = ("max_len", "max_new_tokens", "oracle")


class RequestRefusedError(ValueError):
    """The request can never be served by this pool (longer than the model's context or the pool)."""


class PoolFullError(RuntimeError):
    """No room for the request right now; nothing was changed. Wait for a request to finish."""


class ContiguousPool:
    """Reserve one contiguous range per request at admission; first-fit placement in address space."""

    def __init__(self, num_slots: int, max_len: int, reserve: str = "max_len"):
        if reserve not in RESERVE_POLICIES:
            raise ValueError(f"reserve must be one of {RESERVE_POLICIES}, got {reserve!r}")
        if num_slots <= 0 or max_len <= 0:
            raise ValueError(f"num_slots and max_len must be positive, got {num_slots}, {max_len}")
        self.num_slots, self.max_len, self.reserve = num_slots, max_len, reserve
        self.ranges: dict[int, tuple[int, int]] = {}  # req_id -> (start, length); kept sorted via _starts
        self._starts: list[tuple[int, int]] = []  # sorted (start, req_id)
        self._tokens: dict[int, int] = {}

    @property
    def name(self) -> str:
        return f"contiguous ({self.reserve})"

    @property
    def capacity(self) -> int:
        return self.num_slots

    def reservation(self, req: Request) -> int:
        """Slots reserved for ``req`` at admission."""
        if self.reserve == "max_len":
            return self.max_len
        if self.reserve == "max_new_tokens":
            return min(req.prompt_len + req.max_new_tokens, self.max_len)
        return req.total_len

    def check(self, req: Request) -> None:
        """Raise RequestRefusedError if ``req`` could never be admitted, even to an empty pool."""
        _check_context(req, self.max_len)
        if self.reservation(req) > self.num_slots:
            raise RequestRefusedError(
                f"request {req.req_id} needs a reservation of {self.reservation(req)} slots but the pool has "
                f"only {self.num_slots}: use a bigger pool or a smaller max_len"
            )

    def gaps(self) -> list[tuple[int, int]]:
        """Free ranges ``(start, length)`` in address order."""
        out, cursor = [], 0
        for start, rid in self._starts:
            if start > cursor:
                out.append((cursor, start - cursor))
            cursor = start + self.ranges[rid][1]
        if cursor < self.num_slots:
            out.append((cursor, self.num_slots - cursor))
        return out

    def _first_fit(self, need: int) -> int | None:
        return next((start for start, length in self.gaps() if length >= need), None)

    def can_admit(self, req: Request, num_tokens: int) -> bool:
        return self._first_fit(self.reservation(req)) is not None

    def admit(self, req: Request, num_tokens: int) -> int:
        """Reserve a range for ``req`` holding ``num_tokens`` tokens now; returns its start address."""
        self.check(req)
        if req.req_id in self.ranges:
            raise ValueError(f"request {req.req_id} is already in the pool")
        need = self.reservation(req)
        if num_tokens > need:
            raise ValueError(f"{num_tokens} tokens do not fit request {req.req_id}'s reservation of {need}")
        start = self._first_fit(need)
        if start is None:
            raise PoolFullError(f"no free range of {need} slots for request {req.req_id} (gaps: {self.gaps()})")
        self.ranges[req.req_id] = (start, need)
        bisect.insort(self._starts, (start, req.req_id))
        self._tokens[req.req_id] = num_tokens
        return start

    def can_append(self, req_id: int) -> bool:
        return self._tokens[req_id] < self.ranges[req_id][1]

    def append(self, req_id: int) -> int:
        """One more token for ``req_id``; returns its slot address."""
        if not self.can_append(req_id):
            raise PoolFullError(f"request {req_id} has filled its reservation of {self.ranges[req_id][1]} slots")
        self._tokens[req_id] += 1
        return self.ranges[req_id][0] + self._tokens[req_id] - 1

    def free(self, req_id: int) -> None:
        start, _ = self.ranges.pop(req_id)
        self._starts.remove((start, req_id))
        del self._tokens[req_id]

    def tokens(self, req_id: int) -> int:
        """Tokens the request holds now."""
        return self._tokens[req_id]

    def allocated(self, req_id: int) -> int:
        """Slots the request holds (used or not)."""
        return self.ranges[req_id][1]

    def external(self, waiting: Request | None) -> int:
        """Free slots in gaps too small for ``waiting``'s reservation (0 when nobody waits)."""
        if waiting is None:
            return 0
        need = self.reservation(waiting)
        return sum(length for _, length in self.gaps() if length < need)


class PagedPool:
    """Blocks of ``block_size`` slots from labkit.paged.BlockManager; one block at a time, on demand."""

    def __init__(self, num_slots: int, max_len: int, block_size: int = 16, watermark: float = 0.01):
        if block_size <= 0 or num_slots < block_size:
            raise ValueError(f"need 0 < block_size <= num_slots, got block_size={block_size}, num_slots={num_slots}")
        if not 0 <= watermark < 1:
            raise ValueError(f"watermark is a fraction of the blocks in [0, 1), got {watermark}")
        self.num_slots, self.max_len, self.block_size = num_slots, max_len, block_size
        self.manager = BlockManager(num_slots // block_size, block_size)
        # Admission leaves this many blocks free, so the running requests can grow for a few steps
        # before a newcomer has to be preempted again (vLLM's block manager keeps a similar watermark).
        self.watermark_blocks = int(watermark * self.manager.num_blocks)

    @property
    def name(self) -> str:
        return f"paged (block {self.block_size})"

    @property
    def capacity(self) -> int:
        # A remainder smaller than one block cannot be used at all; it is not part of the pool.
        return self.manager.num_blocks * self.block_size

    def tokens(self, req_id: int) -> int:
        """Tokens the request holds now."""
        return self.manager.seqs[req_id].num_tokens

    def check(self, req: Request) -> None:
        _check_context(req, self.max_len)
        if self.manager.blocks_needed(req.total_len) > self.manager.num_blocks:
            raise RequestRefusedError(
                f"request {req.req_id} needs {self.manager.blocks_needed(req.total_len)} blocks of "
                f"{self.block_size} but the pool has only {self.manager.num_blocks}"
            )

    def can_admit(self, req: Request, num_tokens: int) -> bool:
        """Admission policy: the blocks for ``num_tokens`` tokens, with the watermark left over (an empty
        pool admits without it: the watermark protects running requests, and there are none)."""
        spare = self.watermark_blocks if self.manager.seqs else 0
        return self.manager.num_free_blocks - self.manager.blocks_needed(num_tokens) >= spare

    def admit(self, req: Request, num_tokens: int) -> list[int]:
        """Blocks for the request's first ``num_tokens`` tokens; returns its block table."""
        self.check(req)
        if not self.manager.can_allocate(num_tokens):
            raise PoolFullError(
                f"request {req.req_id} needs {self.manager.blocks_needed(num_tokens)} blocks, "
                f"{self.manager.num_free_blocks} free"
            )
        return self.manager.allocate(req.req_id, num_tokens)

    def can_append(self, req_id: int) -> bool:
        return self.manager.can_append(req_id)

    def append(self, req_id: int) -> int:
        return self.manager.append_slot(req_id)

    def free(self, req_id: int) -> None:
        self.manager.free(req_id)

    def allocated(self, req_id: int) -> int:
        return len(self.manager.seqs[req_id].block_table) * self.block_size

    def external(self, waiting: Request | None) -> int:
        return 0  # any free block serves any request: no gap is ever too small


Pool = ContiguousPool | PagedPool


def _check_context(req: Request, max_len: int) -> None:
    if req.prompt_len + req.max_new_tokens > max_len:
        raise RequestRefusedError(
            f"request {req.req_id}: prompt {req.prompt_len} + max_new_tokens {req.max_new_tokens} = "
            f"{req.prompt_len + req.max_new_tokens} tokens exceeds the model's context max_len={max_len}; "
            "shorten the prompt or lower max_new_tokens"
        )


# ---------------------------------------------------------------------------------------------
# Replaying a trace
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Residency:
    """One stay of a request in the pool, from admission to finish (or preemption).

    It holds ``tokens_at(t) = start_tokens + 1 + (t - admit_step)`` tokens after step t: at admission
    it (re)computes ``start_tokens`` tokens of prompt (and of earlier output, after a preemption)
    and produces one new token; each later step adds one.
    """

    req_id: int
    admit_step: int
    start_tokens: int
    total_len: int
    address: int | None = None  # contiguous: start of the range
    reserved: int | None = None  # contiguous: length of the range
    blocks: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # paged: (block_id, step taken)
    end_step: int | None = None  # last step it held memory
    preempted: bool = False

    def tokens_at(self, step: int) -> int:
        return self.start_tokens + 1 + step - self.admit_step


@dataclasses.dataclass
class Simulation:
    """What happened to the pool over a trace: counts per step (arrays of length num_steps)."""

    pool_name: str
    capacity: int
    step_time_s: float
    counts: dict[str, np.ndarray]  # CATEGORIES -> slots per step; they sum to capacity
    waiting: np.ndarray  # requests waiting after admission, per step
    head_need: np.ndarray  # contiguous: slots the first waiting request needs in one gap (0: none waits)
    running: np.ndarray  # requests in the pool, per step
    residencies: list[Residency]
    refused: list[tuple[int, str]]  # (req_id, reason)
    num_preemptions: int
    block_size: int | None = None

    @property
    def num_steps(self) -> int:
        return len(self.waiting)

    @property
    def saturated(self) -> np.ndarray:
        """Steps at which some request was kept waiting: the pool, not the arrivals, was the limit."""
        return self.waiting > 0

    def shares(self, window: str = "saturated") -> dict[str, float]:
        """Mean share of the pool in each category over ``window``: "saturated" steps (the vLLM paper
        measures a loaded server), or "busy" steps (any request in the pool). A run that never
        saturated is averaged over its busy steps (``fragmentation.report`` says so)."""
        mask = self.saturated if window == "saturated" else self.running > 0
        if not mask.any():
            mask = self.running > 0  # never saturated: fall back to the busy steps
        return {c: float(self.counts[c][mask].mean() / self.capacity) for c in CATEGORIES}

    def useful_share(self, window: str = "saturated") -> float:
        return self.shares(window)["used"]


def simulate(trace: Trace, pool: Pool, step_time_s: float = 0.02, max_steps: int = 1_000_000) -> Simulation:
    """Replay ``trace`` through ``pool`` and account for every slot at every step.

    Each step: (1) arrivals join the waiting queue (a request the pool can never hold is refused and
    recorded); (2) every running request gets one more token slot; a paged pool that is out of
    blocks preempts the most recently admitted request by recompute (frees its blocks, requeues it
    at the front; vLLM's default); (3) waiting requests are admitted first-come first-served while
    they fit (no skipping ahead); (4) the slots are counted; (5) finished requests leave.
    ``step_time_s`` converts the trace's arrival times into steps.
    """
    pending = deque(sorted(trace.requests, key=lambda r: r.arrival_s))
    waiting: deque[tuple[Request, int]] = deque()  # (request, tokens it already has: prompt [+ output])
    running: dict[int, tuple[Request, Residency]] = {}  # admission order = dict order
    residencies, refused = [], []
    counts = {c: [] for c in CATEGORIES}
    n_waiting, n_running, head_need = [], [], []
    preemptions = 0
    step = 0
    while pending or waiting or running:
        if step >= max_steps:
            raise RuntimeError(f"simulation did not finish in {max_steps} steps")
        while pending and pending[0].arrival_s <= step * step_time_s:
            req = pending.popleft()
            try:
                pool.check(req)
            except RequestRefusedError as e:
                refused.append((req.req_id, str(e)))
                continue
            waiting.append((req, req.prompt_len))
        # (2) decode: one more slot for each running request
        for rid in list(running):
            while rid in running and not pool.can_append(rid):
                victim = next(reversed(running))  # the most recently admitted request
                req_v, res_v = running.pop(victim)
                pool.free(victim)
                res_v.end_step, res_v.preempted = step - 1, True
                waiting.appendleft((req_v, res_v.tokens_at(step - 1)))
                preemptions += 1
            if rid in running:
                slot = pool.append(rid)
                if isinstance(pool, PagedPool) and slot % pool.block_size == 0:  # first slot of a new block
                    running[rid][1].blocks.append((slot // pool.block_size, step))
        # (3) admit, first come first served
        while waiting and pool.can_admit(waiting[0][0], waiting[0][1] + 1):
            req, have = waiting.popleft()
            placed = pool.admit(req, have + 1)
            res = Residency(req.req_id, step, have, req.total_len)
            if isinstance(pool, PagedPool):
                res.blocks = [(b, step) for b in placed]
            else:
                res.address, res.reserved = placed, pool.reservation(req)
            running[req.req_id] = (req, res)
            residencies.append(res)
        # (4) account
        used = reserved = internal = 0
        for rid, (req, res) in running.items():
            n, alloc = pool.tokens(rid), pool.allocated(rid)
            will_fill = min(alloc, req.total_len)
            used += n
            reserved += will_fill - n
            internal += alloc - will_fill
        external = pool.external(waiting[0][0] if waiting else None)
        for c, v in zip(CATEGORIES, (used, reserved, internal, external,
                                     pool.capacity - used - reserved - internal - external)):
            counts[c].append(v)
        n_waiting.append(len(waiting))
        head_need.append(pool.reservation(waiting[0][0]) if waiting and isinstance(pool, ContiguousPool) else 0)
        n_running.append(len(running))
        # (5) finished requests leave
        for rid in [rid for rid, (req, _) in running.items() if pool.tokens(rid) >= req.total_len]:
            running.pop(rid)[1].end_step = step
            pool.free(rid)
        step += 1
    return Simulation(
        pool_name=pool.name,
        capacity=pool.capacity,
        step_time_s=step_time_s,
        counts={c: np.asarray(v, dtype=np.int64) for c, v in counts.items()},
        waiting=np.asarray(n_waiting),
        head_need=np.asarray(head_need),
        running=np.asarray(n_running),
        residencies=residencies,
        refused=refused,
        num_preemptions=preemptions,
        block_size=getattr(pool, "block_size", None),
    )


def make_pool(cache: str, num_slots: int, max_len: int, reserve: str = "max_len", block_size: int = 16,
              watermark: float = 0.01) -> Pool:
    """``cache`` is "contiguous" (``reserve`` applies) or "paged" (``block_size``, ``watermark`` apply)."""
    if cache == "contiguous":
        return ContiguousPool(num_slots, max_len, reserve)
    if cache == "paged":
        return PagedPool(num_slots, max_len, block_size, watermark)
    raise ValueError(f"cache must be 'contiguous' or 'paged', got {cache!r}")
