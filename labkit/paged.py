"""Paged KV-cache bookkeeping: physical blocks, their reference counts, and per-sequence block tables.

The vocabulary is vLLM's / nano-vllm's, so a learner can read those codebases next:

* A **block** holds the K/V of ``block_size`` consecutive tokens of one sequence. ``block_id`` names a
  physical block (a row of the cache tensor ``[num_blocks, block_size, num_kv_heads, head_dim]``).
* A sequence's **block table** maps its logical blocks (0, 1, 2, ...) to physical ``block_id``\\ s, so a
  sequence's K/V need not be contiguous::

      tokens      t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .  .        block_size = 4, num_tokens = 10
      logical     block 0     | block 1     | block 2          num_blocks = 3
      block_table [     7     ,      2      ,     5      ]     last_block_num_tokens = 2

* A **slot** is one token's place in the cache: ``slot = block_id * block_size + offset``. The
  ``slot_mapping`` of a range of tokens is what the cache-write kernel needs.
* ``ref_count[block_id]`` counts the block tables that hold a block. ``fork`` (parallel sampling,
  beam search) and prefix sharing make ``ref_count > 1``; a block returns to the free list when it
  reaches 0.
* **Copy-on-write**: a shared block is never written. When a sequence appends a token into a last
  block it shares, it first gets a private copy; ``append_slot`` records the ``(src, dst)`` block copy
  that the cache must perform (``take_copies()``) before it writes the token's K/V.

Nothing here touches tensors: this module only decides *where* tokens go. The engine's
``PagedKVStore`` (``labkit.engine.kv_store``) stores K/V at those slots; ``labkit.prefix_cache`` adds
hash-based reuse of full blocks; the engine's scheduler frees or swaps sequences when blocks run out.

``block_table_figure(bm)`` draws the block tables and ref counts (plotly), for the notebooks.

Every operation either succeeds or raises *before* changing anything, so a ``NoFreeBlocksError``
leaves the allocator exactly as it was (no block is lost) and the caller can preempt and retry.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable

__all__ = [
    "BlockAllocator",
    "BlockManager",
    "SequenceBlocks",
    "NoFreeBlocksError",
    "DoubleFreeError",
    "UnknownSequenceError",
    "blocks_needed",
    "block_table_figure",
]

SeqId = Hashable


class NoFreeBlocksError(RuntimeError):
    """Not enough free blocks for the request. Nothing was allocated; preempt a sequence and retry."""


class DoubleFreeError(ValueError):
    """A block (or sequence) was freed more times than it was taken."""


class UnknownSequenceError(KeyError):
    """The sequence id has no block table (never allocated, or already freed)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that ``num_tokens`` tokens occupy: ``ceil(num_tokens / block_size)``."""
    return (num_tokens + block_size - 1) // block_size


class BlockAllocator:
    """The pool of physical blocks: a free list plus a reference count per block.

    The free list is ordered: ``free`` puts a block at the back and ``allocate`` takes from the front,
    so the block handed out is the one that has been free the longest. The prefix cache relies on this
    order for LRU eviction of cached-but-unreferenced blocks (vLLM v1 does the same).
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_count: list[int] = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def free_block_ids(self) -> list[int]:
        """Free blocks in the order ``allocate`` will hand them out (least recently freed first)."""
        return list(self._free)

    def can_allocate(self, n: int = 1) -> bool:
        return n <= len(self._free)

    def allocate(self) -> int:
        """Take the least recently freed block; its ref_count becomes 1."""
        if not self._free:
            raise NoFreeBlocksError(f"no free blocks: all {self.num_blocks} blocks are in use")
        block_id, _ = self._free.popitem(last=False)
        self.ref_count[block_id] = 1
        return block_id

    def take(self, block_id: int) -> None:
        """Take one particular free block off the free list (ref_count 0 -> 1).

        Used by the prefix cache when a new request hits a cached block that no sequence holds.
        """
        self._check_id(block_id)
        if self.ref_count[block_id] != 0:
            raise ValueError(f"block {block_id} is not free (ref_count {self.ref_count[block_id]}); use incref")
        del self._free[block_id]
        self.ref_count[block_id] = 1

    def incref(self, block_id: int) -> None:
        """One more block table holds ``block_id`` (fork, prefix hit)."""
        self._check_id(block_id)
        if self.ref_count[block_id] == 0:
            raise ValueError(f"incref of free block {block_id}: allocate or take it first")
        self.ref_count[block_id] += 1

    def free(self, block_id: int) -> bool:
        """Drop one reference; at zero the block goes to the back of the free list. Returns True then."""
        self._check_id(block_id)
        if self.ref_count[block_id] == 0:
            raise DoubleFreeError(f"block {block_id} is already free (ref_count 0): freed twice?")
        self.ref_count[block_id] -= 1
        if self.ref_count[block_id] == 0:
            self._free[block_id] = None
            return True
        return False

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block_id {block_id} out of range [0, {self.num_blocks})")

    def __repr__(self) -> str:
        return f"BlockAllocator(num_blocks={self.num_blocks}, free={self.num_free_blocks})"


@dataclass
class SequenceBlocks:
    """One sequence's block table and token count, with the block arithmetic as properties."""

    block_size: int
    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0

    @property
    def num_blocks(self) -> int:
        """Logical blocks the tokens occupy (== len(block_table))."""
        return blocks_needed(self.num_tokens, self.block_size)

    @property
    def last_block_num_tokens(self) -> int:
        """Tokens in the last block (block_size when it is full, 0 when there are no tokens)."""
        if self.num_tokens == 0:
            return 0
        return self.num_tokens - (self.num_blocks - 1) * self.block_size

    def slot(self, position: int) -> int:
        """Cache slot of the token at ``position``."""
        return self.block_table[position // self.block_size] * self.block_size + position % self.block_size


class BlockManager:
    """Block tables for many sequences over one :class:`BlockAllocator`.

    Life of a sequence::

        bm.allocate(seq, num_prompt_tokens)     # prefill: blocks for the prompt
        slots = bm.slot_mapping(seq, 0, n)      # where the prompt's K/V go
        while decoding:
            if not bm.can_append(seq): preempt someone (labkit/engine/scheduler.py)
            slot = bm.append_slot(seq)          # room for one more token (may copy-on-write)
            copies = bm.take_copies()           # [(src, dst)] block copies to do before writing
        bm.free(seq)                            # finished or preempted by recompute

    ``fork(parent, child)`` gives ``child`` the parent's blocks (``ref_count`` + 1 each); the first
    write into a shared last block copies it.
    """

    def __init__(self, num_blocks: int, block_size: int, allocator: BlockAllocator | None = None):
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        if allocator is not None and allocator.num_blocks != num_blocks:
            raise ValueError(f"allocator has {allocator.num_blocks} blocks, BlockManager was told {num_blocks}")
        self.block_size = block_size
        self.allocator = allocator if allocator is not None else BlockAllocator(num_blocks)
        self.seqs: dict[SeqId, SequenceBlocks] = {}
        self._finished: set[SeqId] = set()  # freed ids, for a clearer error message
        self._copies: list[tuple[int, int]] = []

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free_blocks

    @property
    def ref_count(self) -> list[int]:
        return self.allocator.ref_count

    def seq(self, seq_id: SeqId) -> SequenceBlocks:
        if seq_id not in self.seqs:
            state = "was already freed" if seq_id in self._finished else "was never allocated"
            raise UnknownSequenceError(f"sequence {seq_id!r} has no block table: it {state}")
        return self.seqs[seq_id]

    def block_table(self, seq_id: SeqId) -> list[int]:
        """Physical block ids of the sequence's logical blocks (a copy)."""
        return list(self.seq(seq_id).block_table)

    def num_tokens(self, seq_id: SeqId) -> int:
        return self.seq(seq_id).num_tokens

    def slot_mapping(self, seq_id: SeqId, start: int = 0, end: int | None = None) -> list[int]:
        """Cache slots of the tokens at positions ``[start, end)`` (default: all of them)."""
        s = self.seq(seq_id)
        end = s.num_tokens if end is None else end
        if not 0 <= start <= end <= s.num_tokens:
            raise ValueError(f"token range [{start}, {end}) outside sequence {seq_id!r} of {s.num_tokens} tokens")
        return [s.slot(p) for p in range(start, end)]

    def blocks_needed(self, num_tokens: int) -> int:
        return blocks_needed(num_tokens, self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.allocator.can_allocate(self.blocks_needed(num_tokens))

    def can_append(self, seq_id: SeqId) -> bool:
        """Whether one more token fits: a new block if the last is full, a copy if the last is shared."""
        return self.allocator.can_allocate(self._blocks_for_append(self.seq(seq_id)))

    def num_used_slots(self) -> int:
        """Token slots that hold a live token, counting each shared physical block once.

        Blocks in use x block_size overstates occupancy (partial last blocks); this is the honest count.
        """
        filled: dict[int, int] = {}
        for s in self.seqs.values():
            for i, b in enumerate(s.block_table):
                n = min(self.block_size, s.num_tokens - i * self.block_size)
                filled[b] = max(filled.get(b, 0), n)
        return sum(filled.values())

    # ---- mutations -----------------------------------------------------------------------------
    def allocate(self, seq_id: SeqId, num_tokens: int) -> list[int]:
        """Give a new sequence blocks for its first ``num_tokens`` tokens; returns its block table."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} already has a block table; free it first")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        n = self.blocks_needed(num_tokens)
        self._require(n, f"allocate {num_tokens} tokens for sequence {seq_id!r}")
        s = SequenceBlocks(self.block_size, [self._new_block() for _ in range(n)], num_tokens)
        self.seqs[seq_id] = s
        self._finished.discard(seq_id)
        return list(s.block_table)

    def append_slot(self, seq_id: SeqId) -> int:
        """Make room for one more token of ``seq_id`` and return its slot.

        ``| full blocks ... | last block: [x x . .] |`` -> the token goes to the first free offset of
        the last block; if that block is full a new block is appended; if it is shared
        (``ref_count > 1``) it is first copied (copy-on-write) and the copy is queued for
        ``take_copies()``.
        """
        s = self.seq(seq_id)
        self._require(self._blocks_for_append(s), f"append a token to sequence {seq_id!r}")
        return self._append_token(s)

    def append_slots(self, seq_id: SeqId, n: int) -> list[int]:
        """``n`` more tokens at once (chunked prefill, speculative tokens); all or nothing."""
        s = self.seq(seq_id)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        need = self.blocks_needed(s.num_tokens + n) - len(s.block_table)
        if n > 0 and s.num_tokens % self.block_size != 0 and self.allocator.ref_count[s.block_table[-1]] > 1:
            need += 1  # the shared partial last block is copied first
        self._require(need, f"append {n} tokens to sequence {seq_id!r}")
        return [self._append_token(s) for _ in range(n)]

    def take_copies(self) -> list[tuple[int, int]]:
        """The ``(src_block, dst_block)`` copies queued by copy-on-write since the last call."""
        copies, self._copies = self._copies, []
        return copies

    def fork(self, parent_id: SeqId, child_id: SeqId) -> list[int]:
        """``child`` starts as a copy of ``parent`` sharing every block (no new block is needed)."""
        parent = self.seq(parent_id)
        if child_id in self.seqs:
            raise ValueError(f"cannot fork into {child_id!r}: it already has a block table")
        for b in parent.block_table:
            self.allocator.incref(b)
        self.seqs[child_id] = SequenceBlocks(self.block_size, list(parent.block_table), parent.num_tokens)
        self._finished.discard(child_id)
        return list(parent.block_table)

    def free(self, seq_id: SeqId) -> None:
        """Release the sequence's blocks (finished, or preempted by recompute). Freeing twice raises."""
        s = self.seq(seq_id)
        # Last block first: with LRU reuse of free blocks, a prompt's tail is then evicted before its head.
        for b in reversed(s.block_table):
            self._release_block(b)
        del self.seqs[seq_id]
        self._finished.add(seq_id)

    # ---- hooks for subclasses (prefix cache) ---------------------------------------------------
    def _new_block(self) -> int:
        return self.allocator.allocate()

    def _release_block(self, block_id: int) -> None:
        self.allocator.free(block_id)

    # ---- internals -----------------------------------------------------------------------------
    def _append_token(self, s: SequenceBlocks) -> int:
        if s.num_tokens % self.block_size == 0:
            s.block_table.append(self._new_block())
        else:
            self._copy_on_write(s, len(s.block_table) - 1)
        s.num_tokens += 1
        return s.slot(s.num_tokens - 1)

    def _blocks_for_append(self, s: SequenceBlocks) -> int:
        if s.num_tokens % self.block_size == 0:
            return 1  # last block full (or none): a new block
        return 1 if self.allocator.ref_count[s.block_table[-1]] > 1 else 0  # shared: a private copy

    def _copy_on_write(self, s: SequenceBlocks, index: int) -> None:
        src = s.block_table[index]
        if self.allocator.ref_count[src] == 1:
            return
        dst = self._new_block()
        self._release_block(src)  # ref_count > 1, so src stays allocated for the other holders
        s.block_table[index] = dst
        self._copies.append((src, dst))

    def _require(self, n: int, what: str) -> None:
        if not self.allocator.can_allocate(n):
            raise NoFreeBlocksError(
                f"cannot {what}: needs {n} free block(s), {self.allocator.num_free_blocks} of "
                f"{self.allocator.num_blocks} free. Nothing was allocated; preempt a sequence and retry."
            )

    def __repr__(self) -> str:
        return (f"BlockManager(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"sequences={len(self.seqs)}, free={self.num_free_blocks})")


def block_table_figure(bm: BlockManager, title: str = "Block tables"):
    """Plotly picture: one row per sequence, one cell per logical block, coloured and labelled by its
    physical block id and ref_count; shared blocks stand out by colour and a ref_count > 1."""
    import plotly.graph_objects as go

    seqs = list(bm.seqs)
    width = max((len(bm.seqs[s].block_table) for s in seqs), default=1) or 1
    z, text = [], []
    for s in seqs:
        table = bm.seqs[s].block_table
        z.append([float(b) for b in table] + [None] * (width - len(table)))
        row = []
        for i, b in enumerate(table):
            n = min(bm.block_size, bm.seqs[s].num_tokens - i * bm.block_size)
            row.append(f"block {b}<br>ref {bm.ref_count[b]}<br>{n}/{bm.block_size} tok")
        text.append(row + [""] * (width - len(table)))
    fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", x=[f"logical {i}" for i in range(width)],
                               y=[f"seq {s}" for s in seqs], colorscale="Turbo", zmin=0, zmax=max(bm.num_blocks - 1, 1),
                               showscale=False, xgap=3, ygap=3, hoverinfo="text"))
    fig.update_layout(title=title, height=120 + 70 * len(seqs), yaxis_autorange="reversed",
                      margin=dict(l=60, r=20, t=50, b=30))
    return fig
