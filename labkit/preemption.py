"""Preemption: what a paged server does when the blocks run out in the middle of decoding.

A paged cache admits requests block by block (no up-front reservation, so many more fit), but then
a running request can find no free block for its next token. The scheduler must take blocks back
from someone; vLLM picks the lowest-priority running request (FCFS: the latest arrival) and either

    recompute  frees its blocks; it goes back to the front of the waiting queue and, when
               readmitted, prefills prompt + everything generated so far in one pass
               (costs FLOPs: ~2 x parameters per recomputed token)
    swap       copies its blocks to CPU memory and frees them; when blocks free up it is copied
               back and decoding simply continues (costs bytes over PCIe, out and back in)

Either way the request must produce exactly the tokens it would have produced uninterrupted;
``tests/test_preemption.py`` checks that with a real model and real K/V tensors.

::

    step():  swap in (oldest first)  ->  admit waiting (FCFS, only if nothing is swapped out)
             ->  decode every running sequence one token; if no block for it, preempt the
                 latest-arriving running sequence (perhaps itself) and retry

:class:`Engine` runs a real :class:`~labkit.model.LlamaForCausalLM` (``model=...``: K/V in a plain-torch
:class:`BlockKVCache`, greedy decoding) or, with ``model=None``, only the bookkeeping, timed by a
:class:`StepCostModel` (notebook 07 uses that to play larger traces than the CPU could run).
With ``prefix_caching=True`` it uses :class:`~labkit.prefix_cache.PrefixCachingBlockManager` and skips
the cached part of each prompt (used by notebook 06 and :mod:`labkit.side_channel`).
"""
from __future__ import annotations

import bisect
import dataclasses
import time
from typing import Sequence

import torch

from labkit.attention import attention_ref
from labkit.kv_cache import KVCache
from labkit.paged import BlockAllocator, BlockManager
from labkit.prefix_cache import PrefixCachingBlockManager

POLICIES = ("recompute", "swap")


class BlockKVCache(KVCache):
    """K/V stored in blocks: ``k[layer]`` is ``(num_blocks, block_size, num_kv_heads, head_dim)``.

    Plain torch, one sequence per forward (batch 1), for CPU experiments; ``labkit.paged_cache``
    is the batched Triton version. ``bind`` says where this forward's tokens go::

        cache.bind(block_table, slots, seq_len)   # slots of the new tokens; seq_len after them
        model(ids, positions, cache=cache)        # attend() writes K/V at the slots, then reads
                                                  # the first seq_len tokens through block_table
    Only slots of live tokens are ever read, so whatever a freed block held (even NaN) is never seen.
    """

    def __init__(self, config, num_blocks: int, block_size: int, dtype=torch.float32, device="cpu"):
        shape = (config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self._bound = None

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block, every layer."""
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def bind(self, block_table: Sequence[int], slots: Sequence[int], seq_len: int) -> "BlockKVCache":
        self._bound = (torch.as_tensor(list(block_table), dtype=torch.long),
                       torch.as_tensor(list(slots), dtype=torch.long), seq_len)
        return self

    def attend(self, layer_idx, q, k, v, positions):
        if self._bound is None:
            raise RuntimeError("BlockKVCache.attend before bind(block_table, slots, seq_len)")
        table, slots, seq_len = self._bound
        if k.shape[0] != 1 or k.shape[2] != len(slots):
            raise ValueError(f"bound {len(slots)} slots for one sequence, got k of shape {tuple(k.shape)}")
        _, nb, bs, hkv, d = self.k.shape
        self.k[layer_idx].view(nb * bs, hkv, d)[slots] = k[0].transpose(0, 1).to(self.k.dtype)  # (T, Hkv, D)
        self.v[layer_idx].view(nb * bs, hkv, d)[slots] = v[0].transpose(0, 1).to(self.v.dtype)
        keys = self.k[layer_idx][table].reshape(-1, hkv, d)[:seq_len]  # (L, Hkv, D): live tokens only
        values = self.v[layer_idx][table].reshape(-1, hkv, d)[:seq_len]
        k_pos = torch.arange(seq_len, device=q.device)[None]
        return attention_ref(q, keys.transpose(0, 1)[None].to(q.dtype), values.transpose(0, 1)[None].to(q.dtype),
                             positions, k_pos)

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: block dst gets block src's K/V (every layer)."""
        for src, dst in copies:
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]


@dataclasses.dataclass(frozen=True)
class StepCostModel:
    """Simulated clock: ``step_s = overhead_s + per_token_s * tokens`` for one batched forward
    (prefill tokens + one per decoding sequence), plus ``bytes / swap_bytes_per_s`` for swaps."""

    overhead_s: float
    per_token_s: float
    swap_bytes_per_s: float

    def step(self, num_tokens: int) -> float:
        return self.overhead_s + self.per_token_s * num_tokens if num_tokens else 0.0

    @classmethod
    def calibrate(cls, model, lengths: Sequence[int] = (1, 16, 64), repeats: int = 3) -> "StepCostModel":
        """Fit overhead and per-token cost to real forwards of ``model`` on this machine, and measure
        the copy bandwidth of a 64 MiB tensor (on a CPU-only machine that is what a swap costs)."""
        import numpy as np

        times = []
        with torch.no_grad():
            for n in lengths:
                ids = torch.zeros(1, n, dtype=torch.long)
                best = min(_timed(lambda: model(ids)) for _ in range(repeats))
                times.append(best)
        slope, intercept = np.polyfit(np.asarray(lengths, float), np.asarray(times), 1)
        src = torch.empty(16 * 2**20, dtype=torch.float32)
        dst = torch.empty_like(src)
        copy_s = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
        return cls(max(float(intercept), 0.0), max(float(slope), 1e-9), src.numel() * 4 / copy_s)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclasses.dataclass(eq=False)
class Request:
    """One request and what happened to it. Times are seconds on the engine's clock."""

    req_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0
    cache_salt: str | None = None
    output_ids: list[int] = dataclasses.field(default_factory=list)
    status: str = "waiting"  # waiting | running | swapped | finished
    first_token_s: float | None = None
    finish_s: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit of its (last) prefill

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def ttft(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def latency(self) -> float:
        return self.finish_s - self.arrival_s

    def _key(self):
        return (self.arrival_s, self.req_id)


class Engine:
    """FCFS paged serving with preemption by ``policy`` ("recompute" or "swap"). See the module docstring.

    num_blocks / block_size: the device KV pool. num_cpu_blocks: swap space (swap policy); when it is
    full a victim is recomputed instead (counted in ``stats["swap_fallbacks"]``). watermark: fraction
    of blocks kept free when admitting, so that fresh admissions do not immediately force preemptions.
    """

    def __init__(self, model=None, *, num_blocks: int, block_size: int = 16, policy: str = "recompute",
                 num_cpu_blocks: int | None = None, max_num_seqs: int = 16, prefix_caching: bool = False,
                 cost: StepCostModel | None = None, config=None, watermark: float = 0.01):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if model is None and cost is None:
            raise ValueError("without a model the engine needs a StepCostModel (cost=...) for its clock")
        self.model, self.policy, self.cost = model, policy, cost
        self.config = model.config if model is not None else config
        if self.config is None:
            raise ValueError("pass config=... (a LlamaConfig) when model is None: it sizes blocks and FLOPs")
        manager = PrefixCachingBlockManager if prefix_caching else BlockManager
        self.bm = manager(num_blocks, block_size)
        self.block_size, self.max_num_seqs = block_size, max_num_seqs
        self.watermark_blocks = int(watermark * num_blocks)
        self.bytes_per_block = self.config.kv_bytes_per_token(4) * block_size  # fp32 K and V, every layer
        self.kv = BlockKVCache(self.config, num_blocks, block_size) if model is not None else None
        num_cpu_blocks = num_blocks if num_cpu_blocks is None else num_cpu_blocks
        self.cpu_allocator = BlockAllocator(num_cpu_blocks)
        self.cpu_k = self.cpu_v = None
        if model is not None and policy == "swap":  # on a GPU these would be pinned host tensors
            self.cpu_k = torch.zeros((self.kv.k.shape[0], num_cpu_blocks) + self.kv.k.shape[2:])
            self.cpu_v = torch.zeros_like(self.cpu_k)
        self.cpu_tables: dict[int, list[int]] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.swapped: list[Request] = []
        self.finished: list[Request] = []
        self.now = 0.0
        self.events: list[tuple[int, int, str]] = []  # (step, req_id, "prefill"|"preempt"|"swap_out"|"swap_in"|"finish")
        self.stats = {"steps": 0, "preemptions": 0, "swap_out_bytes": 0, "swap_in_bytes": 0,
                      "recomputed_tokens": 0, "swap_fallbacks": 0, "prefill_tokens": 0, "decode_tokens": 0}
        self._t0 = None

    # ---- public --------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        total = len(req.prompt_ids) + req.max_new_tokens
        if self.bm.blocks_needed(total) > self.bm.num_blocks:
            raise ValueError(f"request {req.req_id} needs {self.bm.blocks_needed(total)} blocks at its longest; "
                             f"the pool has {self.bm.num_blocks}: it could never finish")
        bisect.insort(self.waiting, req, key=Request._key)

    def run(self, requests: Sequence[Request] = ()) -> list[Request]:
        """Serve ``requests`` (and anything already added) to completion; returns them finished."""
        for r in requests:
            self.add(r)
        while self.waiting or self.running or self.swapped:
            self.step()
        return sorted(self.finished, key=Request._key)

    def summary(self) -> dict:
        done = self.finished
        out_tokens = sum(len(r.output_ids) for r in done)
        span = max(r.finish_s for r in done) - min(r.arrival_s for r in done)
        return {"policy": self.policy, "requests": len(done), "throughput_tok_s": out_tokens / span,
                "mean_latency_s": sum(r.latency for r in done) / len(done),
                "mean_ttft_s": sum(r.ttft for r in done) / len(done),
                "recompute_flops": self.stats["recomputed_tokens"] * self.flops_per_token,
                "swap_bytes": self.stats["swap_out_bytes"] + self.stats["swap_in_bytes"], **self.stats}

    @property
    def flops_per_token(self) -> int:
        """~2 FLOPs per weight per token (attention over the context is left out)."""
        c = self.config
        attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        mlp = 3 * c.hidden_size * c.intermediate_size
        return 2 * (c.num_hidden_layers * (attn + mlp) + c.hidden_size * c.vocab_size)

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()
        if not self.running and not self.swapped and self.waiting and self.waiting[0].arrival_s > self._clock():
            self._advance_to(self.waiting[0].arrival_s)  # idle until the next arrival
        step_tokens, swap_bytes = 0, 0
        swap_bytes += self._swap_in()
        prefilled = [] if self.swapped else self._admit()
        step_tokens += sum(n for _, n in prefilled)
        done_prefill = {r.req_id for r, _ in prefilled}
        for r in list(self.running):
            if r.status != "running" or r.req_id in done_prefill:
                continue
            while not self.bm.can_append(r.req_id):
                victim = self.running[-1]  # lowest priority: the latest arrival
                swap_bytes += self._preempt(victim)
                if victim is r:
                    break
            if r.status != "running":
                continue
            self._decode(r)
            step_tokens += 1
        self.stats["steps"] += 1
        if self.cost is not None:
            self.now += self.cost.step(step_tokens) + swap_bytes / self.cost.swap_bytes_per_s
        now = self._clock()
        for r in list(self.running):
            if r.first_token_s is None and r.output_ids:
                r.first_token_s = now
            if len(r.output_ids) >= r.max_new_tokens:
                self.bm.free(r.req_id)
                self.running.remove(r)
                r.status, r.finish_s = "finished", now
                self.events.append((self.stats["steps"] - 1, r.req_id, "finish"))
                self.finished.append(r)

    # ---- internals -----------------------------------------------------------------------------
    def _clock(self) -> float:
        if self.cost is not None:
            return self.now
        return time.perf_counter() - self._t0 + self.now  # self.now holds idle time skipped

    def _advance_to(self, t: float) -> None:
        self.now += t - self._clock()

    def _admit(self) -> list[tuple[Request, int]]:
        """Prefill waiting requests (new or preempted by recompute) in FCFS order while they fit."""
        admitted = []
        now = self._clock()
        while self.waiting and len(self.running) < self.max_num_seqs and self.waiting[0].arrival_s <= now:
            r = self.waiting[0]
            need = self.bm.blocks_needed(len(r.tokens)) + self.watermark_blocks
            if not self.bm.allocator.can_allocate(need):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.pop(0)
            admitted.append((r, self._prefill(r)))
        return admitted

    def _prefill(self, r: Request) -> int:
        tokens = r.tokens
        if isinstance(self.bm, PrefixCachingBlockManager):
            self.bm.allocate(r.req_id, len(tokens), token_ids=tokens, cache_salt=r.cache_salt)
            cached = self.bm.num_cached_tokens(r.req_id)
        else:
            self.bm.allocate(r.req_id, len(tokens))
            cached = 0
        r.num_cached_tokens = cached
        computed = len(tokens) - cached
        if r.output_ids:  # readmitted after preemption by recompute
            self.stats["recomputed_tokens"] += computed
        self.stats["prefill_tokens"] += computed
        self.events.append((self.stats["steps"], r.req_id, "prefill"))
        self._forward_and_sample(r, tokens[cached:], cached, self.bm.slot_mapping(r.req_id, cached, len(tokens)))
        r.status = "running"
        bisect.insort(self.running, r, key=Request._key)
        return computed

    def _decode(self, r: Request) -> None:
        last = r.output_ids[-1]
        if isinstance(self.bm, PrefixCachingBlockManager):
            slot = self.bm.append_slot(r.req_id, token_id=last)
        else:
            slot = self.bm.append_slot(r.req_id)
        copies = self.bm.take_copies()
        if self.kv is not None:
            self.kv.copy_blocks(copies)
        self.stats["decode_tokens"] += 1
        self._forward_and_sample(r, [last], len(r.tokens) - 1, [slot])

    def _forward_and_sample(self, r: Request, ids: list[int], start: int, slots: list[int]) -> None:
        if self.model is None:  # bookkeeping only: a stand-in token
            r.output_ids.append((r.req_id * 7919 + len(r.tokens)) % self.config.vocab_size)
            return
        self.kv.bind(self.bm.block_table(r.req_id), slots, start + len(ids))
        positions = torch.arange(start, start + len(ids))[None]
        with torch.no_grad():
            logits = self.model(torch.tensor([ids]), positions, cache=self.kv)
        r.output_ids.append(int(logits[0, -1].argmax()))

    def _preempt(self, r: Request) -> int:
        """Take ``r``'s blocks back. Returns the bytes swapped out (0 for recompute)."""
        self.running.remove(r)
        r.num_preemptions += 1
        self.stats["preemptions"] += 1
        table = self.bm.block_table(r.req_id)
        if self.policy == "swap" and self.cpu_allocator.can_allocate(len(table)):
            cpu = [self.cpu_allocator.allocate() for _ in table]
            if self.kv is not None:
                self.cpu_k[:, cpu] = self.kv.k[:, table]  # device -> host
                self.cpu_v[:, cpu] = self.kv.v[:, table]
            self.cpu_tables[r.req_id] = cpu
            self.bm.free(r.req_id)
            r.status = "swapped"
            self.events.append((self.stats["steps"], r.req_id, "swap_out"))
            bisect.insort(self.swapped, r, key=Request._key)
            nbytes = len(table) * self.bytes_per_block
            self.stats["swap_out_bytes"] += nbytes
            return nbytes
        if self.policy == "swap":
            self.stats["swap_fallbacks"] += 1
        self.bm.free(r.req_id)
        r.status = "waiting"
        self.events.append((self.stats["steps"], r.req_id, "preempt"))
        bisect.insort(self.waiting, r, key=Request._key)
        return 0

    def _swap_in(self) -> int:
        moved = 0
        while self.swapped and len(self.running) < self.max_num_seqs:
            r = self.swapped[0]
            cpu = self.cpu_tables[r.req_id]
            num_kv = len(r.tokens) - 1  # the last sampled token has no K/V yet
            if not self.bm.allocator.can_allocate(len(cpu) + 1 + self.watermark_blocks):
                break
            table = self.bm.allocate(r.req_id, num_kv)
            if self.kv is not None:
                self.kv.k[:, table] = self.cpu_k[:, cpu]  # host -> device
                self.kv.v[:, table] = self.cpu_v[:, cpu]
            for b in cpu:
                self.cpu_allocator.free(b)
            del self.cpu_tables[r.req_id]
            self.swapped.pop(0)
            r.status = "running"
            self.events.append((self.stats["steps"], r.req_id, "swap_in"))
            bisect.insort(self.running, r, key=Request._key)
            moved += len(cpu) * self.bytes_per_block
        self.stats["swap_in_bytes"] += moved
        return moved
