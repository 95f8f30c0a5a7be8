"""Who runs this step: static batching against continuous (iteration-level) batching.

A server holds ``max_num_seqs`` batch slots (rows of the KV cache) and ``max_num_tokens`` token slots
of KV room. Every step the scheduler decides which requests the model runs:

    one at a time  max_num_seqs = 1: the next request waits until the current one has finished.
    static         a batch is formed only when the engine is empty; it runs until its LAST request
                   finishes. A request that finished early keeps its slot, idle; a request that
                   arrived meanwhile waits for the whole batch (HF ``generate`` on a padded batch).
    continuous     (Orca, OSDI 2022: "iteration-level scheduling") before every step, finished
                   requests give their slot and KV room back and waiting requests are admitted:

        step t:   | A decode | B decode | C decode |          C finishes at t
        step t+1: | A decode | B decode | D prefill|          D takes C's slot at once

Admission rule (both batching policies): first come, first served; the request at the head of the
queue is admitted if a batch slot is free AND its whole reservation (prompt + max_new_tokens) fits in
the free KV room; otherwise nobody behind it is admitted either (no overtaking, so no starvation).
Reserving the whole request up front means a running request never runs out of room, so no
preemption is needed; notebook 04's paged cache reserves block by block instead.

The scheduler knows nothing about the model: it hands a :class:`ScheduledStep` to a runner
(``labkit.serving``) and takes the new tokens back in :meth:`Scheduler.postprocess`.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
from collections import deque

from labkit.memory_pool import RequestRefusedError

POLICIES = ("continuous", "static")


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request and everything that happens to it. Times are seconds on the server's clock."""

    seq_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0
    eos_token_id: int | None = None
    # filled in while it runs
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int | None = None  # batch row / KV-cache row it occupies while running
    output_ids: list[int] = dataclasses.field(default_factory=list)
    token_times: list[float] = dataclasses.field(default_factory=list)  # when each output token was ready
    admitted_s: float | None = None  # when it got a slot
    retired_s: float | None = None  # when it gave the slot back (static: when its whole batch ended)

    def __post_init__(self):
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        if not self.prompt_ids:
            raise ValueError(f"sequence {self.seq_id}: the prompt is empty; a request needs at least one token")
        if self.max_new_tokens < 1:
            raise ValueError(f"sequence {self.seq_id}: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens in the sequence now (prompt + generated): the next token's position."""
        return self.prompt_len + len(self.output_ids)

    @property
    def reservation(self) -> int:
        """KV token slots held from admission to the end: the most this request can ever need."""
        return self.prompt_len + self.max_new_tokens

    @property
    def is_prefill(self) -> bool:
        """True until its prompt has been run (its first step processes the whole prompt)."""
        return not self.output_ids

    @property
    def is_done(self) -> bool:
        return len(self.output_ids) >= self.max_new_tokens or (
            self.eos_token_id is not None and bool(self.output_ids) and self.output_ids[-1] == self.eos_token_id)

    # metrics, defined once here (notebook 03's exercise rewrites them)
    @property
    def ttft(self) -> float:
        """Time to first token: from arrival (so queueing counts) to the first output token."""
        return self.token_times[0] - self.arrival_s

    @property
    def tpot(self) -> float:
        """Time per output token after the first (0 for a one-token answer)."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else 0.0

    @property
    def latency(self) -> float:
        """End to end: arrival to last token."""
        return self.token_times[-1] - self.arrival_s


def fcfs_admit(waiting: list[tuple[int, int]], free_slots: int, free_kv_tokens: int) -> int:
    """How many requests, from the head of the queue, the admission rule lets in now.

    ``waiting``: (prompt_len, max_new_tokens) of each waiting request, oldest first. Each admitted
    request takes one slot and prompt_len + max_new_tokens KV token slots; the first one that does not
    fit stops admission (first come, first served: nobody overtakes it).
    """
    admitted = 0
    for prompt_len, max_new_tokens in waiting:
        need = prompt_len + max_new_tokens
        if free_slots == 0 or need > free_kv_tokens:
            break
        free_slots, free_kv_tokens, admitted = free_slots - 1, free_kv_tokens - need, admitted + 1
    return admitted


@dataclasses.dataclass
class ScheduledStep:
    """What the model runs in one step: prompts to prefill (each yields its first token) and running
    sequences to decode by one token. Every sequence listed advances by exactly one token."""

    prefill: list[Sequence]
    decode: list[Sequence]

    @property
    def seqs(self) -> list[Sequence]:
        return self.prefill + self.decode

    @property
    def num_tokens(self) -> int:
        """Tokens fed to the model this step: whole prompts plus one per decode."""
        return sum(s.prompt_len for s in self.prefill) + len(self.decode)


class Scheduler:
    """Admits, runs and retires sequences; see the module docstring for the policies.

    max_num_seqs: batch slots (rows of the KV cache). max_num_tokens: KV room in token slots shared by
    all running requests. max_model_len: the longest sequence (prompt + output) a slot can hold.
    """

    def __init__(self, max_num_seqs: int, max_num_tokens: int, max_model_len: int, policy: str = "continuous"):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if min(max_num_seqs, max_num_tokens, max_model_len) < 1:
            raise ValueError(f"max_num_seqs, max_num_tokens and max_model_len must be >= 1, got "
                             f"{max_num_seqs}, {max_num_tokens}, {max_model_len}")
        self.max_num_seqs, self.max_num_tokens, self.max_model_len = max_num_seqs, max_num_tokens, max_model_len
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in slot order of admission
        self.finished: list[Sequence] = []
        self.free_slots: list[int] = list(range(max_num_seqs))
        self.used_kv_tokens = 0

    # --- queue -------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a request. Refuses (RequestRefusedError, nothing changed) one that could never run."""
        self.check(seq)
        if any(s is seq for s in self.waiting):
            raise ValueError(f"sequence {seq.seq_id} is already queued")
        self.waiting.append(seq)

    def check(self, seq: Sequence) -> None:
        """Raise if ``seq`` could never be served here, even by an empty engine; changes nothing."""
        if seq.status is not SequenceStatus.WAITING or seq.output_ids:
            raise ValueError(f"sequence {seq.seq_id} was already scheduled; add a fresh Sequence")
        if seq.reservation > self.max_model_len:
            raise RequestRefusedError(
                f"sequence {seq.seq_id}: prompt ({seq.prompt_len}) + max_new_tokens ({seq.max_new_tokens}) = "
                f"{seq.reservation} tokens exceeds max_model_len={self.max_model_len}; shorten the prompt or "
                "ask for fewer tokens")
        if seq.reservation > self.max_num_tokens:
            raise RequestRefusedError(
                f"sequence {seq.seq_id}: needs {seq.reservation} KV token slots but the whole pool holds "
                f"{self.max_num_tokens}; it could never be admitted")

    @property
    def free_kv_tokens(self) -> int:
        return self.max_num_tokens - self.used_kv_tokens

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ----------------------------------------------------------------------------
    def schedule(self, now: float = 0.0) -> ScheduledStep:
        """Admit what the policy and the admission rule allow, then list this step's work."""
        if self.free_slots and (self.policy == "continuous" or not self.running):  # static: only when empty
            head = itertools.islice(self.waiting, len(self.free_slots))  # no more than the free slots can enter
            n = fcfs_admit([(s.prompt_len, s.max_new_tokens) for s in head], len(self.free_slots), self.free_kv_tokens)
            for _ in range(n):
                seq = self.waiting.popleft()
                seq.status, seq.slot, seq.admitted_s = SequenceStatus.RUNNING, self.free_slots.pop(0), now
                self.used_kv_tokens += seq.reservation
                self.running.append(seq)
        active = [s for s in self.running if not s.is_done]  # static: finished ones idle in their slot
        return ScheduledStep(prefill=[s for s in active if s.is_prefill], decode=[s for s in active if not s.is_prefill])

    def postprocess(self, step: ScheduledStep, token_ids: list[int], now: float) -> list[Sequence]:
        """Append each sequence's new token (in ``step.seqs`` order) and retire what finished (static:
        only once the whole batch has). Returns the sequences whose last token came this step."""
        if len(token_ids) != len(step.seqs):
            raise ValueError(f"{len(token_ids)} tokens for {len(step.seqs)} scheduled sequences")
        for seq, tok in zip(step.seqs, token_ids):
            seq.output_ids.append(int(tok))
            seq.token_times.append(now)
        completed = [s for s in step.seqs if s.is_done]
        if self.policy == "continuous" or all(s.is_done for s in self.running):
            for seq in [s for s in self.running if s.is_done]:  # static: the batch ends together
                self._retire(seq, now)
        return completed

    def _retire(self, seq: Sequence, now: float) -> None:
        seq.status, seq.retired_s = SequenceStatus.FINISHED, now
        self.running.remove(seq)
        self.free_slots.append(seq.slot)
        self.free_slots.sort()
        self.used_kv_tokens -= seq.reservation
        self.finished.append(seq)
