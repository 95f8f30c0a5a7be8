"""The engine's block manager: the paged pool (ref counts, prefix hash chain, copy-on-write), swap space
in CPU memory, and the contiguous reserve-up-front allocator as a policy of the same interface.

    paged       blocks on demand: admission takes blocks for the tokens computed now; each step adds a
                block when a sequence's last one is full (vLLM). A prefix-cache hit puts cached blocks
                into the table with ref_count + 1 (``labkit.prefix_cache``).
    contiguous  admission reserves the request's whole future at once as ONE run of consecutive block
                ids, placed first fit in the pool's address space, so a running request never needs
                another block (HF / FasterTransformer / Orca; the waste notebook 02 measures). How much,
                ``reserve=``:

                  "max_new_tokens"  prompt + the client's max_tokens cap
                  "max_len"         the model's whole context, whatever the request (Orca's "Max")
                  "oracle"          the slots the request will really fill (prompt + output - 1: the
                                    last token is returned, never fed back), which only a replay of a
                                    known trace can tell: set ``oracle`` to a function seq -> that count

                block ids  0 ............................................. num_blocks
                           | seq 3: 7 blocks | free: 2 |  seq 5: 9 blocks  | free: 14 |
                a request needing 10 blocks waits although 16 are free: the gaps are too small
                (external fragmentation). With block_size=1 a block is one token slot.

Block bookkeeping itself is :class:`labkit.prefix_cache.PrefixCachingBlockManager` (a
:class:`labkit.paged.BlockManager` that can also find full blocks by content) over a
:class:`labkit.paged.BlockAllocator` (or any allocator with its interface, e.g. notebook 04's exercise);
this class adds the engine's view: a :class:`~labkit.engine.sequence.Sequence` in, block copies out.
Every method either succeeds or raises before changing anything.
"""
from __future__ import annotations

from typing import Callable

from labkit.engine.config import RESERVE
from labkit.engine.sequence import Sequence
from labkit.paged import BlockAllocator, NoFreeBlocksError, SequenceBlocks, blocks_needed
from labkit.prefix_cache import PrefixCachingBlockManager


class EngineBlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, allocation: str = "paged",
                 enable_prefix_caching: bool = False, num_cpu_blocks: int = 0, max_model_len: int | None = None,
                 reserve: str = "max_new_tokens", allocator=None):
        if reserve not in RESERVE:
            raise ValueError(f"reserve must be one of {RESERVE}, got {reserve!r}")
        self.block_size, self.allocation, self.reserve = block_size, allocation, reserve
        self.enable_prefix_caching = enable_prefix_caching
        self.max_model_len = max_model_len
        self.bm = PrefixCachingBlockManager(num_blocks, block_size, allocator=allocator)
        self.cpu = BlockAllocator(num_cpu_blocks)
        self.cpu_tables: dict[int, list[int]] = {}  # swapped-out sequence -> its CPU blocks
        # contiguous only
        self.oracle: Callable[[Sequence], int] | None = None  # reserve="oracle": seq -> slots it will fill
        self.runs: dict[int, tuple[int, int]] = {}  # seq_id -> (first block id, number of blocks)
        self._live: dict[int, int] = {}  # seq_id -> slots claimed for computed tokens (the rest is reserved)

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.bm.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.bm.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.bm.num_blocks - self.bm.num_free_blocks

    @property
    def ref_count(self) -> list[int]:
        return self.bm.ref_count

    def num_used_slots(self) -> int:
        """Slots holding a live token (each shared block counted once; a contiguous reservation's empty
        tail is not). Without sharing this is one sum per sequence, not a walk over every block."""
        if self.allocation == "contiguous":
            return sum(self._live.values())
        if not self.enable_prefix_caching:
            return sum(s.num_tokens for s in self.bm.seqs.values())
        return self.bm.num_used_slots()

    def num_live_tokens(self, seq: Sequence) -> int:
        """Slots ``seq`` fills now (contiguous: the used part of its reservation)."""
        if self.allocation == "contiguous":
            return self._live.get(seq.seq_id, 0)
        return self.bm.seq(seq.seq_id).num_tokens if self.holds(seq) else 0

    def block_table(self, seq: Sequence) -> list[int]:
        return self.bm.block_table(seq.seq_id)

    def holds(self, seq: Sequence) -> bool:
        return seq.seq_id in self.bm.seqs

    def _reserve_tokens(self, seq: Sequence) -> int:
        """Token slots a contiguous reservation holds for ``seq`` (see the module docstring)."""
        context = self.max_model_len if self.max_model_len is not None else seq.max_num_tokens
        if self.reserve == "max_len":
            want = context
        elif self.reserve == "oracle":
            if self.oracle is None:
                raise ValueError("reserve='oracle' needs the output each request will really produce, which no live "
                                 "server knows: set block_manager.oracle = fn(seq) -> slots it will fill (a trace "
                                 "replay does: labkit.pool_history.replay)")
            want = int(self.oracle(seq))
        else:
            want = seq.max_num_tokens
        return max(min(want, context), seq.num_tokens)

    def blocks_to_reserve(self, seq: Sequence) -> int:
        """Contiguous: blocks of the whole reservation (what the pool must hold for ``seq`` ever to run); paged: 0."""
        if self.allocation != "contiguous":
            return 0
        return blocks_needed(self._reserve_tokens(seq), self.block_size)

    def free_runs(self) -> list[tuple[int, int]]:
        """Contiguous: the free gaps ``(first block id, length)`` in address order."""
        out, cursor = [], 0
        for start, n in sorted(self.runs.values()):
            if start > cursor:
                out.append((cursor, start - cursor))
            cursor = start + n
        if cursor < self.num_blocks:
            out.append((cursor, self.num_blocks - cursor))
        return out

    def _first_fit(self, n: int) -> int | None:
        return next((start for start, length in self.free_runs() if length >= n), None)

    def can_place(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether admitting ``seq`` fits now beyond counting free blocks: contiguous needs one gap large
        enough for its whole reservation (first fit); paged blocks go anywhere."""
        if self.allocation != "contiguous":
            return True
        return self._first_fit(self.blocks_to_admit(seq, num_tokens)) is not None

    def prefix_hit_tokens(self, seq: Sequence) -> int:
        """Tokens of ``seq`` already in the prefix cache (always leaves its last token to compute)."""
        if not self.enable_prefix_caching:
            return 0
        return len(self.bm.match_prefix(seq.token_ids, seq.cache_salt)) * self.block_size

    def blocks_to_admit(self, seq: Sequence, num_tokens: int) -> int:
        """Free blocks that admitting ``seq`` with its first ``num_tokens`` tokens takes from the pool."""
        if self.allocation == "contiguous":
            return blocks_needed(self._reserve_tokens(seq), self.block_size)
        need = blocks_needed(num_tokens, self.block_size)
        if self.enable_prefix_caching:
            hit = self.bm.match_prefix(seq.token_ids[:num_tokens], seq.cache_salt)
            # a hit on a block nobody holds still comes off the free list
            need -= sum(self.bm.ref_count[b] > 0 for b in hit)
        return need

    def blocks_to_append(self, seq: Sequence, n: int) -> int:
        """Free blocks that ``n`` more token slots for ``seq`` take (a new block, or a copy-on-write)."""
        s = self.bm.seq(seq.seq_id)
        if self.allocation == "contiguous":
            if s.num_tokens < seq.num_computed_tokens + n:
                raise RuntimeError(f"sequence {seq.seq_id} outgrew its contiguous reservation of {s.num_tokens} tokens")
            return 0
        need = blocks_needed(s.num_tokens + n, self.block_size) - len(s.block_table)
        if n and s.num_tokens % self.block_size and self.bm.ref_count[s.block_table[-1]] > 1:
            need += 1  # the shared partial last block is copied first
        return need

    # ---- mutations -----------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Blocks for the first ``num_tokens`` tokens of a sequence being admitted; sets its
        ``num_cached_tokens`` / ``num_computed_tokens`` from the prefix cache."""
        if self.allocation == "contiguous":
            self._allocate_run(seq, num_tokens)
            seq.num_cached_tokens = 0
        elif self.enable_prefix_caching:
            self.bm.allocate(seq.seq_id, num_tokens, token_ids=seq.token_ids[:num_tokens], cache_salt=seq.cache_salt)
            seq.num_cached_tokens = self.bm.num_cached_tokens(seq.seq_id)
        else:
            self.bm.allocate(seq.seq_id, num_tokens)
            seq.num_cached_tokens = 0
        seq.num_computed_tokens = seq.num_cached_tokens
        seq.block_table = self.bm.block_table(seq.seq_id)

    def _allocate_run(self, seq: Sequence, num_tokens: int) -> None:
        """Reserve one run of consecutive free blocks, the first that is long enough (first fit)."""
        if seq.seq_id in self.bm.seqs:
            raise ValueError(f"sequence {seq.seq_id} already has a block table; free it first")
        tokens = self._reserve_tokens(seq)
        n = blocks_needed(tokens, self.block_size)
        start = self._first_fit(n)
        if start is None:
            raise NoFreeBlocksError(f"no run of {n} consecutive free blocks for sequence {seq.seq_id} "
                                    f"(free gaps (first block, length): {self.free_runs()}); nothing was allocated")
        block_ids = list(range(start, start + n))
        for b in block_ids:  # every block outside the runs is free: contiguous pools share nothing
            self.bm.allocator.take(b)
        self.bm.seqs[seq.seq_id] = SequenceBlocks(self.block_size, block_ids, tokens)
        self.runs[seq.seq_id] = (start, n)
        self._live[seq.seq_id] = num_tokens

    def append_slots(self, seq: Sequence, n: int) -> None:
        """Room for tokens ``[num_computed_tokens, num_computed_tokens + n)``; all or nothing."""
        if self.allocation == "contiguous":
            self.blocks_to_append(seq, n)  # raises if the reservation is too small
            self._live[seq.seq_id] = max(self._live[seq.seq_id], seq.num_computed_tokens + n)
            return  # the reservation's block table never changes (seq.block_table was set at admission)
        else:
            s = self.bm.seq(seq.seq_id)
            extra = seq.num_computed_tokens + n - s.num_tokens  # slots not yet held
            if extra > 0:
                start = s.num_tokens
                if self.enable_prefix_caching:
                    self.bm.append_slots(seq.seq_id, extra, token_ids=seq.token_ids[start:start + extra])
                else:
                    self.bm.append_slots(seq.seq_id, extra)
        seq.block_table = self.bm.block_table(seq.seq_id)

    def take_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write block copies (src, dst) queued since the last call."""
        return self.bm.take_copies()

    def free(self, seq: Sequence) -> None:
        if self.holds(seq):
            self.bm.free(seq.seq_id)
        self.runs.pop(seq.seq_id, None)
        self._live.pop(seq.seq_id, None)
        if seq.seq_id in self.cpu_tables:
            for b in self.cpu_tables.pop(seq.seq_id):
                self.cpu.free(b)
        seq.block_table = []

    def can_swap_out(self, seq: Sequence) -> bool:
        return self.cpu.can_allocate(blocks_needed(seq.num_computed_tokens, self.block_size))

    def swap_out(self, seq: Sequence) -> list[tuple[int, int]]:
        """Move the blocks holding ``seq``'s computed tokens to CPU memory; returns (device, cpu) copies."""
        n = blocks_needed(seq.num_computed_tokens, self.block_size)
        if not self.cpu.can_allocate(n):
            raise NoFreeBlocksError(f"swap space full: sequence {seq.seq_id} needs {n} CPU blocks, "
                                    f"{self.cpu.num_free_blocks} free")
        device = self.bm.block_table(seq.seq_id)[:n]
        cpu = [self.cpu.allocate() for _ in range(n)]
        self.bm.free(seq.seq_id)
        self.runs.pop(seq.seq_id, None)
        self._live.pop(seq.seq_id, None)
        self.cpu_tables[seq.seq_id] = cpu
        seq.block_table = []
        return list(zip(device, cpu))

    def blocks_to_swap_in(self, seq: Sequence, n: int) -> int:
        """Blocks for its computed tokens plus room for the ``n`` it computes next."""
        return blocks_needed(seq.num_computed_tokens + n, self.block_size)

    def swap_in(self, seq: Sequence, n: int) -> list[tuple[int, int]]:
        """Bring a swapped sequence back with room for ``n`` more tokens; returns (cpu, device) copies.
        Its new blocks are not prefix-cached."""
        need = self.blocks_to_swap_in(seq, n)
        if not self.bm.allocator.can_allocate(need):
            raise NoFreeBlocksError(f"cannot swap in sequence {seq.seq_id}: needs {need} blocks, "
                                    f"{self.num_free_blocks} free")
        cpu = self.cpu_tables.pop(seq.seq_id)
        self.bm.allocate(seq.seq_id, seq.num_computed_tokens)
        device = self.bm.block_table(seq.seq_id)
        for b in cpu:
            self.cpu.free(b)
        seq.block_table = list(device)
        return list(zip(cpu, device))
