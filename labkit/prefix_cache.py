"""Prefix caching: requests that start with the same tokens share the K/V blocks of that start.

A *full* block is named by a hash chained over the blocks before it::

    h0 = hash(salt,  tokens[0:16])          block_size = 16
    h1 = hash(h0,    tokens[16:32])         h1 names "these 16 tokens, after exactly that prefix":
    h2 = hash(h1,    tokens[32:48])         K/V depend on every earlier token, so the chain must too.

A new request walks its chain; the longest run of hashes already in the table is a hit: those
blocks go into its block table with ``ref_count + 1`` and prefill starts after them
(``num_cached_tokens``). The rest get fresh blocks, whose hashes are registered once full.

When the last sequence holding a cached block finishes, the block goes back to the free list but
keeps its hash, so a later request can still hit it. The allocator hands out the least recently
freed block first, which evicts cached blocks in LRU order (vLLM v1's design).

``cache_salt`` starts the chain from a per-tenant value, so two tenants never share blocks. That
closes the timing side channel of :mod:`labkit.side_channel` (vLLM's ``cache_salt``, CVE-2025-46570),
at the price of hits across tenants. The same ``BlockManager.fork`` that shares blocks between a
prompt's parallel samples is measured at the end of this file (``parallel_sampling_blocks``).

The engine's block manager (``labkit/engine/block_manager.py``) is built on this class; notebook 06's
experiments on the engine are in ``labkit.prefix_sharing``.
"""
from __future__ import annotations

import hashlib
from typing import Hashable, Sequence

from labkit.paged import BlockManager, blocks_needed

__all__ = ["hash_block", "block_hashes", "PrefixCachingBlockManager", "parallel_sampling_blocks"]


def hash_block(parent_hash: int | None, token_ids: Sequence[int], salt: str | None = None) -> int:
    """64-bit hash of one full block, chained on its parent's hash (None for the first block).

    ``salt`` only matters for the first block (``parent_hash is None``); every later block inherits it
    through the chain. sha256 rather than Python's ``hash`` so that values are stable across runs and
    hard to collide on purpose.
    """
    head = f"salt={salt}" if parent_hash is None else f"parent={parent_hash}"
    text = head + "|" + ",".join(str(int(t)) for t in token_ids)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str | None = None) -> list[int]:
    """Chained hashes of every *full* block of ``token_ids`` (a partial last block has none)."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start:start + block_size], salt)
        hashes.append(parent)
    return hashes


class PrefixCachingBlockManager(BlockManager):
    """A :class:`~labkit.paged.BlockManager` whose full blocks can be found again by content.

    ``allocate(seq_id, num_tokens, token_ids=..., cache_salt=...)`` reuses cached blocks for the longest
    matching prefix; ``num_cached_tokens(seq_id)`` says how many prompt tokens need no prefill.
    Without ``token_ids`` it behaves exactly like a plain BlockManager.

    At least one prompt token is always left to compute (the model needs its logits for the first
    output token), so at most ``(num_tokens - 1) // block_size`` blocks are hit. Cached blocks are full
    and are never written again, so prefix sharing never needs copy-on-write.
    """

    def __init__(self, num_blocks: int, block_size: int, **kwargs):
        super().__init__(num_blocks, block_size, **kwargs)
        self.hash_to_block: dict[int, int] = {}
        self.block_hash: dict[int, int] = {}
        self._seq_tokens: dict[Hashable, list[int]] = {}
        self._seq_hashes: dict[Hashable, list[int]] = {}
        self._seq_salt: dict[Hashable, str | None] = {}
        self._num_cached: dict[Hashable, int] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {"queried_tokens": 0, "hit_tokens": 0, "queries": 0, "evictions": 0}

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the cache / prompt tokens asked for (since ``reset_stats``)."""
        q = self.stats["queried_tokens"]
        return self.stats["hit_tokens"] / q if q else 0.0

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    def num_cached_tokens(self, seq_id: Hashable) -> int:
        self.seq(seq_id)
        return self._num_cached.get(seq_id, 0)

    def match_prefix(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        """Block ids of the longest cached prefix of ``token_ids`` (read-only: nothing is taken)."""
        hashes = block_hashes(token_ids, self.block_size, cache_salt)[: max(0, (len(token_ids) - 1) // self.block_size)]
        hit = []
        for h in hashes:
            if h not in self.hash_to_block:
                break
            hit.append(self.hash_to_block[h])
        return hit

    def allocate(self, seq_id, num_tokens: int, token_ids: Sequence[int] | None = None,
                 cache_salt: str | None = None) -> list[int]:
        if token_ids is None:
            table = super().allocate(seq_id, num_tokens)
            self._num_cached[seq_id] = 0
            return table
        if len(token_ids) != num_tokens:
            raise ValueError(f"num_tokens={num_tokens} but {len(token_ids)} token_ids were given")
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} already has a block table; free it first")
        hit = self.match_prefix(token_ids, cache_salt)
        a = self.allocator
        # Hits on unreferenced cached blocks come off the free list too: count them before touching anything.
        need = self.blocks_needed(num_tokens) - len(hit) + sum(a.ref_count[b] == 0 for b in hit)
        self._require(need, f"allocate {num_tokens} tokens for sequence {seq_id!r}")
        for b in hit:
            if a.ref_count[b] == 0:
                a.take(b)
            else:
                a.incref(b)
        super().allocate(seq_id, num_tokens - len(hit) * self.block_size)
        s = self.seqs[seq_id]
        s.block_table[:0] = hit
        s.num_tokens = num_tokens
        self._seq_tokens[seq_id] = list(token_ids)
        self._seq_salt[seq_id] = cache_salt
        self._seq_hashes[seq_id] = []
        self._num_cached[seq_id] = len(hit) * self.block_size
        # The new full blocks are findable from now on, before their K/V exist: the caller must prefill
        # them before the next allocate (the engine does so in the same step, as vLLM's scheduler does).
        self._register_full_blocks(seq_id)
        self.stats["queries"] += 1
        self.stats["queried_tokens"] += num_tokens
        self.stats["hit_tokens"] += len(hit) * self.block_size
        return list(s.block_table)

    def append_slot(self, seq_id, token_id: int | None = None) -> int:
        """As BlockManager.append_slot; pass ``token_id`` so a block filled by decoding is cached too."""
        slot = super().append_slot(seq_id)
        if seq_id in self._seq_tokens:
            if token_id is None:  # without the token we can no longer name later blocks: stop caching this one
                self._forget_tokens(seq_id)
            else:
                self._seq_tokens[seq_id].append(int(token_id))
                self._register_full_blocks(seq_id)
        return slot

    def append_slots(self, seq_id, n: int, token_ids: Sequence[int] | None = None) -> list[int]:
        if token_ids is not None and len(token_ids) != n:
            raise ValueError(f"n={n} but {len(token_ids)} token_ids were given")
        slots = super().append_slots(seq_id, n)
        if seq_id in self._seq_tokens:
            if token_ids is None:
                self._forget_tokens(seq_id)
            else:
                self._seq_tokens[seq_id].extend(int(t) for t in token_ids)
                self._register_full_blocks(seq_id)
        return slots

    def fork(self, parent_id, child_id) -> list[int]:
        table = super().fork(parent_id, child_id)
        if parent_id in self._seq_tokens:
            self._seq_tokens[child_id] = list(self._seq_tokens[parent_id])
            self._seq_hashes[child_id] = list(self._seq_hashes[parent_id])
            self._seq_salt[child_id] = self._seq_salt[parent_id]
        self._num_cached[child_id] = self._num_cached.get(parent_id, 0)
        return table

    def free(self, seq_id) -> None:
        super().free(seq_id)  # cached blocks keep their hash on the free list until reused
        self._forget_tokens(seq_id)
        self._num_cached.pop(seq_id, None)

    # ---- internals -----------------------------------------------------------------------------
    def _new_block(self) -> int:
        block_id = self.allocator.allocate()
        h = self.block_hash.pop(block_id, None)
        if h is not None:  # evict: the block is about to hold other tokens
            del self.hash_to_block[h]
            self.stats["evictions"] += 1
        return block_id

    def _register_full_blocks(self, seq_id) -> None:
        tokens, hashes, s = self._seq_tokens[seq_id], self._seq_hashes[seq_id], self.seqs[seq_id]
        bs = self.block_size
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            h = hash_block(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs], self._seq_salt[seq_id])
            hashes.append(h)
            b = s.block_table[i]
            # The first block with given content stays the cached one; a duplicate computed meanwhile is
            # simply not registered (it is freed normally).
            if h not in self.hash_to_block and b not in self.block_hash:
                self.hash_to_block[h] = b
                self.block_hash[b] = h

    def _forget_tokens(self, seq_id) -> None:
        self._seq_tokens.pop(seq_id, None)
        self._seq_hashes.pop(seq_id, None)
        self._seq_salt.pop(seq_id, None)


# ==== what fork saves ==========================================================================

def parallel_sampling_blocks(prompt_len: int, output_lens: Sequence[int], block_size: int = 16) -> dict:
    """Blocks held at the end of ``n = len(output_lens)`` samples of one prompt, shared vs independent.

    Shared: allocate the prompt once, ``fork`` it n - 1 times, append each sample's tokens (the shared
    partial last block is copied on the first write: copy-on-write). Independent: n separate sequences.
    """
    n = len(output_lens)
    total = n * blocks_needed(prompt_len + max(output_lens), block_size) + 1
    shared = BlockManager(total, block_size)
    shared.allocate(0, prompt_len)
    for i in range(1, n):
        shared.fork(0, i)
    copies = 0
    for i, out in enumerate(output_lens):
        for _ in range(out):
            shared.append_slot(i)
        copies += len(shared.take_copies())
    independent = sum(blocks_needed(prompt_len + out, block_size) for out in output_lens)
    used = shared.allocator.num_used_blocks
    return {"n": n, "blocks_shared": used, "blocks_independent": independent, "cow_copies": copies,
            "memory_saved": 1 - used / independent}
