"""The scheduler: which sequences run this step, with how many tokens each, and where their K/V go.

    schedule():
      1. running sequences, oldest first: each gets its new tokens (1 for a decode, a chunk of a prompt
         under the step's token budget); if the pool has no block for them, preempt the latest arrival
         (recompute: free its blocks, back to the queue; swap: copy them to CPU memory) and retry
      2. swapped sequences come back, oldest first, if nothing was preempted this step
      3. waiting sequences are admitted, FCFS, while a slot, the token budget and the blocks
         (above the watermark) allow; nobody overtakes the head of the queue
    postprocess(): count the computed tokens, append the sampled ones, retire what finished

Blocks are allocated here, before the forward: the model runner and the attention only read the
resulting block tables and slot mapping. Batching policies are choices inside ``schedule()``:
static admits only into an empty engine and holds a finished request's blocks until its whole batch
ends; one-at-a-time is continuous batching with one slot.
"""
from __future__ import annotations

import dataclasses
from collections import deque

from labkit.engine import policies
from labkit.engine.block_manager import EngineBlockManager
from labkit.engine.config import EngineConfig
from labkit.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens whose K/V this step computes: [num_computed_tokens, + num_new_tokens)

    @property
    def samples(self) -> bool:
        """Whether this step ends level with the sequence, so its last logits give a new token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (device block, cpu block)
    swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (cpu block, device block)
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # copy-on-write (src, dst)
    preempted: list[Sequence] = dataclasses.field(default_factory=list)
    admitted: list[Sequence] = dataclasses.field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_decode_only(self) -> bool:
        return bool(self.scheduled) and all(s.num_new_tokens == 1 and s.samples for s in self.scheduled)


def preempt_by_recompute(seq: Sequence, block_manager: EngineBlockManager, waiting: deque) -> None:
    """Drop ``seq``'s K/V and queue it again: readmission prefills prompt + output so far (FCFS order kept)."""
    block_manager.free(seq)
    seq.num_computed_tokens = 0
    seq.status = SequenceStatus.WAITING
    waiting.appendleft(seq)
    Scheduler._sort(waiting)


class Scheduler:
    choose_victim = staticmethod(policies.choose_victim)  # replaceable: notebook 07's exercise plugs in its own
    preempt_by_recompute = staticmethod(preempt_by_recompute)

    def __init__(self, config: EngineConfig, max_model_len: int):
        self.config, self.max_model_len = config, max_model_len
        self.block_manager = EngineBlockManager(
            config.num_blocks, config.block_size, allocation=config.allocation,
            enable_prefix_caching=config.enable_prefix_caching, num_cpu_blocks=config.num_cpu_blocks,
            max_model_len=max_model_len, reserve=config.reserve)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order = priority order
        self.swapped: deque[Sequence] = deque()
        self.batch_done: list[Sequence] = []  # static batching: finished, blocks held until the batch ends

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # ---- 1-3 -----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg, bm = self.config, self.block_manager
        out = SchedulerOutput([])
        budget = cfg.max_num_batched_tokens
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            n = policies.chunk_size(seq.num_new_tokens, budget, cfg.enable_chunked_prefill)
            if n == 0:
                continue
            while bm.blocks_to_append(seq, n) > bm.num_free_blocks:
                victim = self.choose_victim(queue + [seq])
                self._preempt(victim, out)
                if victim is seq:
                    break
                queue.remove(victim)
            if seq.status is not SequenceStatus.RUNNING:
                continue
            bm.append_slots(seq, n)
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n

        if not out.preempted:
            while self.swapped and len(self.running) < cfg.max_num_seqs and budget > 0:
                seq = self.swapped[0]
                n = policies.chunk_size(seq.num_new_tokens, budget, cfg.enable_chunked_prefill)
                free = bm.num_free_blocks - policies.admission_watermark(len(self.running), cfg.watermark_blocks)
                if n == 0 or bm.blocks_to_swap_in(seq, n) > free:
                    break
                self.swapped.popleft()
                out.swap_in += bm.swap_in(seq, n)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                bm.append_slots(seq, n)
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n

        static_blocked = cfg.batching == "static" and (self.running or self.batch_done)
        if not out.preempted and not self.swapped and not static_blocked:
            self._admit(out, budget)
        out.copies = bm.take_copies()
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        cfg, bm = self.config, self.block_manager
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            cached = bm.prefix_hit_tokens(seq)
            n = policies.chunk_size(seq.num_tokens - cached, budget, cfg.enable_chunked_prefill)
            if n == 0:
                break
            need = bm.blocks_to_admit(seq, cached + n)
            if not policies.can_admit(need, bm.num_free_blocks, len(self.running), cfg.watermark_blocks,
                                      cfg.max_num_seqs) or not bm.can_place(seq, cached + n):
                break  # contiguous: enough free blocks may still lack one gap large enough (first fit)
            self.waiting.popleft()
            bm.allocate(seq, cached + n)  # sets num_computed_tokens to the prefix hit (== cached)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.admitted.append(seq)
            out.scheduled.append(ScheduledSeq(seq, cached + n - seq.num_computed_tokens))
            budget -= out.scheduled[-1].num_new_tokens

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        bm = self.block_manager
        if self.config.preemption == "none":
            raise RuntimeError(
                f"the KV pool ({bm.num_blocks} blocks) is full and preemption is off; sequence {seq.seq_id} cannot "
                "continue. Use allocation='contiguous' (reserves up front) or preemption='recompute'/'swap'.")
        self.running.remove(seq)
        seq.num_preemptions += 1
        out.preempted.append(seq)
        if self.config.preemption == "swap" and bm.can_swap_out(seq):
            out.swap_out += bm.swap_out(seq)
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
            self._sort(self.swapped)
            return
        self.preempt_by_recompute(seq, bm, self.waiting)

    @staticmethod
    def _sort(q: deque) -> None:
        items = sorted(q, key=lambda s: (s.arrival_s, s.seq_id))
        q.clear()
        q.extend(items)

    # ---- after the forward -----------------------------------------------------------------------
    def postprocess(self, out: SchedulerOutput, sampled: dict[int, int], now: float) -> list[Sequence]:
        """Advance each scheduled sequence; ``sampled[seq_id]`` is the new token of those that sample.
        Returns the sequences that finished this step."""
        finished = []
        for item in out.scheduled:
            seq = item.seq
            samples = item.samples
            seq.num_computed_tokens += item.num_new_tokens
            if not samples:
                continue
            tok = sampled[seq.seq_id]
            seq.token_ids.append(tok)
            seq.token_times.append(now)
            p = seq.params
            reason = policies.is_stopped(tok, seq.num_output_tokens, seq.num_tokens, p.max_tokens, self.max_model_len,
                                         p.stop_token_ids, seq.eos_token_ids, p.ignore_eos)
            if reason is not None:
                self._finish(seq, FinishReason(reason), now)
                finished.append(seq)
        if self.config.batching == "static" and not self.running:
            for seq in self.batch_done:  # the whole static batch has ended: its blocks come back
                self.block_manager.free(seq)
            self.batch_done.clear()
        return finished

    def _finish(self, seq: Sequence, reason: FinishReason, now: float) -> None:
        seq.status, seq.finish_reason, seq.finished_s = SequenceStatus.FINISHED, reason, now
        if seq in self.running:
            self.running.remove(seq)
        if self.config.batching == "static" and reason is not FinishReason.ABORT:
            self.batch_done.append(seq)  # idle in its slot until the batch ends
        else:
            self.block_manager.free(seq)

    def abort(self, seq: Sequence, now: float) -> None:
        """Drop a request wherever it is (call between steps); its blocks and swap space come back."""
        for q in (self.waiting, self.swapped):
            if seq in q:
                q.remove(seq)
        if seq in self.batch_done:
            self.batch_done.remove(seq)
        self._finish(seq, FinishReason.ABORT, now)
