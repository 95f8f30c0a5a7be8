"""Property-based tests of labkit.paged: random sequences of allocate / append / fork / free / preempt.

A tiny fake "cache memory" (one token value per slot) rides along: every append writes the token's
value at its slot after doing the copy-on-write copies the BlockManager asked for, so the test checks
not only the bookkeeping (no leak, no double free, ref counts) but that every live sequence reads back
exactly its own tokens through its block table.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labkit.paged import (
    BlockAllocator,
    BlockManager,
    DoubleFreeError,
    NoFreeBlocksError,
    UnknownSequenceError,
)

MIN_OPERATIONS = 10_000

OPS = ("allocate", "append", "append", "append", "fork", "free", "preempt", "resume", "append_many")
op_lists = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, 10_000), st.integers(0, 24)), min_size=20, max_size=80
)


class Model:
    """The BlockManager plus a fake memory and the tokens each sequence should read back."""

    def __init__(self, num_blocks: int, block_size: int):
        self.bm = BlockManager(num_blocks, block_size)
        self.memory: dict[int, int] = {}  # slot -> token value
        self.tokens: dict[int, list[int]] = {}  # live seq -> its tokens
        self.preempted: dict[int, list[int]] = {}  # seq preempted by recompute -> tokens to redo
        self.next_id = 0
        self.next_token = 0

    def fresh_tokens(self, n):
        out = list(range(self.next_token, self.next_token + n))
        self.next_token += n
        return out

    def write(self, seq, positions):
        for (src, dst) in self.bm.take_copies():
            bs = self.bm.block_size
            for o in range(bs):
                if src * bs + o in self.memory:
                    self.memory[dst * bs + o] = self.memory[src * bs + o]
        slots = self.bm.slot_mapping(seq, positions[0], positions[-1] + 1) if positions else []
        for p, slot in zip(positions, slots):
            self.memory[slot] = self.tokens[seq][p]

    def snapshot(self):
        a = self.bm.allocator
        return (list(a.ref_count), a.free_block_ids(), {k: (list(v.block_table), v.num_tokens) for k, v in self.bm.seqs.items()})

    def check(self):
        bm, a = self.bm, self.bm.allocator
        held = [0] * a.num_blocks
        for seq, s in bm.seqs.items():
            assert len(s.block_table) == s.num_blocks, "block table length != blocks for the tokens"
            assert s.num_tokens == len(self.tokens[seq])
            for b in s.block_table:
                held[b] += 1
            # every live token's slot holds that sequence's token (no one else overwrote it)
            got = [self.memory.get(slot) for slot in bm.slot_mapping(seq)]
            assert got == self.tokens[seq], f"sequence {seq} reads {got}, expected {self.tokens[seq]}"
        assert held == a.ref_count, "ref_count must equal the number of block tables holding each block"
        free = a.free_block_ids()
        assert len(free) == len(set(free)), "a block is on the free list twice"
        assert set(free) == {b for b in range(a.num_blocks) if a.ref_count[b] == 0}, "leak or double free"
        # a block written by one sequence is never in another's table unless the contents agree
        for seq, s in bm.seqs.items():
            if s.num_tokens and s.last_block_num_tokens < bm.block_size:
                last = s.block_table[-1]
                if a.ref_count[last] > 1:
                    # a shared partial block: every holder has the same tokens in it so far
                    for other, t in bm.seqs.items():
                        if other != seq and last in t.block_table:
                            i = t.block_table.index(last)
                            k = s.last_block_num_tokens
                            lo = i * bm.block_size
                            assert self.tokens[other][lo:lo + k] == self.tokens[seq][lo:lo + k]


def run_ops(ops, num_blocks, block_size) -> int:
    m = Model(num_blocks, block_size)
    bm = m.bm
    for kind, pick, n in ops:
        live = sorted(bm.seqs)
        seq = live[pick % len(live)] if live else None
        before = m.snapshot()
        try:
            if kind == "allocate":
                sid = m.next_id
                m.next_id += 1
                bm.allocate(sid, n)
                m.tokens[sid] = m.fresh_tokens(n)
                m.write(sid, list(range(n)))
            elif kind in ("append", "append_many") and seq is not None:
                k = 1 if kind == "append" else n % 6
                start = bm.num_tokens(seq)
                if kind == "append":
                    bm.append_slot(seq)
                else:
                    bm.append_slots(seq, k)
                m.tokens[seq] += m.fresh_tokens(k)
                m.write(seq, list(range(start, start + k)))
            elif kind == "fork" and seq is not None:
                child = m.next_id
                m.next_id += 1
                bm.fork(seq, child)
                m.tokens[child] = list(m.tokens[seq])
            elif kind == "free" and seq is not None:
                bm.free(seq)
                del m.tokens[seq]
                with pytest.raises(UnknownSequenceError):
                    bm.free(seq)  # freeing twice is an error, and changes nothing
            elif kind == "preempt" and seq is not None:
                bm.free(seq)  # preemption by recompute: drop the blocks, keep the tokens
                m.preempted[seq] = m.tokens.pop(seq)
            elif kind == "resume" and m.preempted:
                sid = sorted(m.preempted)[pick % len(m.preempted)]
                toks = m.preempted[sid]
                bm.allocate(sid, len(toks))  # recompute: all its K/V are written again
                del m.preempted[sid]
                m.tokens[sid] = toks
                m.write(sid, list(range(len(toks))))
        except NoFreeBlocksError:
            assert m.snapshot() == before, "a failed allocation must leave the allocator as it was"
            assert bm.take_copies() == []
        m.check()
    # free everything: all ref counts return to zero, every block is free again
    for seq in list(bm.seqs):
        bm.free(seq)
    assert bm.allocator.ref_count == [0] * num_blocks
    assert sorted(bm.allocator.free_block_ids()) == list(range(num_blocks))
    return len(ops)


def test_random_operation_sequences_keep_every_invariant():
    count = {"ops": 0}

    @settings(max_examples=400, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(ops=op_lists, num_blocks=st.integers(1, 24), block_size=st.sampled_from([1, 2, 3, 4, 16]))
    def prop(ops, num_blocks, block_size):
        count["ops"] += run_ops(ops, num_blocks, block_size)

    prop()
    assert count["ops"] >= MIN_OPERATIONS, f"only {count['ops']} operations were tried"


# ---- the documented errors, one by one ---------------------------------------------------------

def test_out_of_blocks_raises_and_loses_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.allocate("a", 8)
    with pytest.raises(NoFreeBlocksError, match="needs 2 free block"):
        bm.allocate("b", 5)
    assert "b" not in bm.seqs and bm.num_free_blocks == 1
    bm.allocate("c", 4)
    bm.append_slots("a", 0)
    with pytest.raises(NoFreeBlocksError):
        bm.append_slot("a")  # a's last block is full and none is free
    assert bm.num_tokens("a") == 8 and bm.num_free_blocks == 0


def test_copy_on_write_of_a_shared_partial_block():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("p", 6)  # blocks [0, 1]; block 1 holds 2 tokens
    bm.fork("p", "c")
    assert bm.ref_count[:2] == [2, 2]
    slot = bm.append_slot("c")
    (src, dst), = bm.take_copies()
    assert (src, bm.block_table("c")) == (1, [0, dst]) and slot == dst * 4 + 2
    assert bm.ref_count[0] == 2 and bm.ref_count[1] == 1 and bm.ref_count[dst] == 1
    bm.append_slot("p")  # p is now the only holder of block 1: no copy
    assert bm.take_copies() == []


def test_fork_with_a_full_last_block_needs_no_copy():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("p", 4)
    bm.fork("p", "c")
    bm.append_slot("c")
    assert bm.take_copies() == [] and bm.block_table("c")[0] == bm.block_table("p")[0]


def test_errors_for_unknown_and_finished_sequences():
    bm = BlockManager(num_blocks=4, block_size=2)
    with pytest.raises(UnknownSequenceError, match="never allocated"):
        bm.append_slot("x")
    with pytest.raises(UnknownSequenceError, match="never allocated"):
        bm.fork("x", "y")
    bm.allocate("a", 3)
    bm.free("a")
    with pytest.raises(UnknownSequenceError, match="already freed"):
        bm.free("a")
    with pytest.raises(UnknownSequenceError):
        bm.block_table("a")
    bm.allocate("b", 1)
    with pytest.raises(ValueError, match="already has a block table"):
        bm.allocate("b", 1)
    with pytest.raises(ValueError, match="already has a block table"):
        bm.fork("b", "b")


def test_allocator_double_free_and_lru_order():
    a = BlockAllocator(3)
    x, y = a.allocate(), a.allocate()
    a.free(y)
    a.free(x)
    with pytest.raises(DoubleFreeError):
        a.free(x)
    assert a.free_block_ids() == [2, y, x]  # least recently freed first
    with pytest.raises(ValueError, match="incref of free block"):
        a.incref(x)


def test_block_arithmetic():
    bm = BlockManager(num_blocks=8, block_size=4)
    for n, blocks, last in [(0, 0, 0), (1, 1, 1), (4, 1, 4), (5, 2, 1), (8, 2, 4), (9, 3, 1)]:
        bm.allocate(n, n)
        s = bm.seq(n)
        assert (s.num_blocks, s.last_block_num_tokens) == (blocks, last)
        bm.free(n)
