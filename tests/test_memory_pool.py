"""The KV pool: placement, refusal without side effects, and accounting that adds up at every step."""
import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from labkit.memory_pool import (CATEGORIES, ContiguousPool, PagedPool, PoolFullError, RequestRefusedError,
                                make_pool, simulate)
from labkit.traces import Request, Trace


def req(i, prompt, output, cap=None, arrival=0.0):
    return Request(i, arrival, prompt, output, output if cap is None else cap)


def trace_of(*requests, max_len=2048):
    return Trace(tuple(requests), preset="hand-made", rate=float("inf"), seed=0, max_len=max_len)


def test_reservation_per_policy():
    r = req(0, prompt=10, output=20, cap=50)
    assert ContiguousPool(1000, 100, "max_len").reservation(r) == 100
    assert ContiguousPool(1000, 100, "max_new_tokens").reservation(r) == 60
    assert ContiguousPool(1000, 100, "oracle").reservation(r) == 30


def test_first_fit_reuses_the_first_gap_that_is_big_enough():
    pool = ContiguousPool(100, 100, "oracle")
    assert pool.admit(req(0, 10, 10), 11) == 0  # [0, 20)
    assert pool.admit(req(1, 20, 10), 21) == 20  # [20, 50)
    assert pool.admit(req(2, 5, 5), 6) == 50  # [50, 60)
    pool.free(0)
    pool.free(2)
    assert pool.gaps() == [(0, 20), (50, 50)]
    assert pool.admit(req(3, 20, 5), 21) == 50  # 25 slots: the gap at 0 is too small
    assert pool.admit(req(4, 10, 5), 11) == 0  # 15 slots: the first gap fits
    assert pool.external(req(5, 10, 10)) == 5  # gap [15, 20) is too small for 20; [75, 100) is not
    assert pool.external(req(6, 20, 10)) == 5 + 25  # both gaps are too small for 30
    assert pool.external(None) == 0


def _state(pool):
    if isinstance(pool, PagedPool):
        return (copy.deepcopy(pool.manager.seqs), pool.manager.allocator.free_block_ids(), list(pool.manager.ref_count))
    return dict(pool.ranges), list(pool._starts), dict(pool._tokens)


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_too_long_requests_are_refused_and_change_nothing(cache):
    pool = make_pool(cache, num_slots=256, max_len=128, reserve="max_new_tokens", block_size=16)
    pool.admit(req(0, 20, 30), 21)
    before = _state(pool)
    with pytest.raises(RequestRefusedError, match="exceeds the model's context max_len=128"):
        pool.admit(req(1, prompt=100, output=20, cap=40), 101)  # 100 + 40 > 128
    assert _state(pool) == before
    small = make_pool(cache, num_slots=64, max_len=128, reserve="max_new_tokens", block_size=16)
    with pytest.raises(RequestRefusedError, match="pool has only"):
        small.admit(req(2, prompt=50, output=50), 51)  # fits the context, not the pool
    assert _state(small) == _state(make_pool(cache, 64, 128, reserve="max_new_tokens", block_size=16))


@pytest.mark.parametrize("cache", ["contiguous", "paged"])
def test_a_full_pool_says_so_and_changes_nothing(cache):
    pool = make_pool(cache, num_slots=64, max_len=64, reserve="oracle", block_size=16)
    pool.admit(req(0, 40, 10), 41)
    before = _state(pool)
    with pytest.raises(PoolFullError):
        pool.admit(req(1, 40, 10), 41)
    assert _state(pool) == before


def test_contiguous_append_stays_inside_the_reservation():
    pool = ContiguousPool(100, 100, "oracle")
    start = pool.admit(req(0, 3, 2), 4)
    assert pool.append(0) == start + 4
    with pytest.raises(PoolFullError, match="filled its reservation"):
        pool.append(0)


def test_one_request_accounting_step_by_step():
    # prompt 5, output 3, reservation 16: holds 6, 7, 8 tokens over its 3 steps
    sim = simulate(trace_of(req(0, 5, 3), max_len=16), ContiguousPool(32, 16, "max_len"))
    assert list(sim.counts["used"]) == [6, 7, 8]
    assert list(sim.counts["reserved"]) == [2, 1, 0]
    assert list(sim.counts["internal"]) == [8, 8, 8]
    assert list(sim.counts["free"]) == [16, 16, 16]


def test_paged_pool_counts_partial_blocks():
    sim = simulate(trace_of(req(0, 5, 3), max_len=16), PagedPool(32, 16, block_size=4))
    # 6 tokens -> 2 blocks (8 slots): 2 slots reserved; 7 -> 1; 8 -> 0
    assert list(sim.counts["used"]) == [6, 7, 8]
    assert list(sim.counts["reserved"]) == [2, 1, 0]
    assert list(sim.counts["free"]) == [24, 24, 24]
    sim = simulate(trace_of(req(0, 5, 1), max_len=16), PagedPool(32, 16, block_size=4))
    assert list(sim.counts["internal"]) == [2]  # 6 tokens in 8 slots, and it stops there


requests = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40), st.floats(0, 2)), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(requests, st.sampled_from(["max_len", "max_new_tokens", "oracle", "paged4", "paged16", "paged4w"]))
def test_simulation_accounts_for_every_slot_and_finishes_everyone(spec, policy):
    reqs = tuple(req(i, p, o, cap=o + 5, arrival=a) for i, (p, o, a) in enumerate(sorted(spec, key=lambda s: s[2])))
    trace = trace_of(*reqs, max_len=96)
    if policy == "paged4w":  # a large watermark: a lone request must still be admitted
        pool = PagedPool(128, 96, block_size=4, watermark=0.5)
    elif policy.startswith("paged"):
        pool = PagedPool(128, 96, block_size=int(policy[5:]))
    else:
        pool = ContiguousPool(128, 96, policy)
    sim = simulate(trace, pool, step_time_s=0.05)
    total = sum(sim.counts[c] for c in CATEGORIES)
    assert (total == sim.capacity).all()
    assert all((sim.counts[c] >= 0).all() for c in CATEGORIES)
    finished = [r.req_id for r in sim.residencies if not r.preempted]
    assert sorted(finished) == [r.req_id for r in reqs]  # everyone finishes exactly once
    for res in sim.residencies:
        if not res.preempted:
            assert res.tokens_at(res.end_step) == res.total_len
    if isinstance(pool, PagedPool):
        assert pool.manager.num_free_blocks == pool.manager.num_blocks  # every block came back
    else:
        assert pool.gaps() == [(0, 128)]


def test_paged_pool_preempts_when_blocks_run_out_and_still_finishes():
    reqs = tuple(req(i, 10, 30) for i in range(4))
    sim = simulate(trace_of(*reqs, max_len=64), PagedPool(64, 64, block_size=4))
    assert sim.num_preemptions > 0
    assert sorted(r.req_id for r in sim.residencies if not r.preempted) == [0, 1, 2, 3]
    assert sim.counts["used"].max() <= 64


def test_paged_admission_keeps_the_watermark_free():
    pool = PagedPool(num_slots=400, max_len=400, block_size=4, watermark=0.1)  # 100 blocks, keep 10 free
    assert pool.watermark_blocks == 10
    assert pool.can_admit(req(0, 300, 90), 391)  # an empty pool admits without the watermark
    pool.admit(req(1, 3, 1), 4)  # 1 block in use: 99 free
    assert pool.can_admit(req(2, 300, 60), 356)  # 89 blocks: 10 left
    assert not pool.can_admit(req(2, 300, 60), 360)  # 90 blocks: 9 left
    pool.admit(req(2, 300, 60), 360)  # admit itself only needs the blocks: the watermark is a policy
    assert pool.manager.num_free_blocks == 9


def test_refused_requests_are_recorded_not_run():
    trace = trace_of(req(0, 10, 10), req(1, 10, 200), max_len=300)
    sim = simulate(trace, ContiguousPool(100, 300, "oracle"))
    assert [rid for rid, _ in sim.refused] == [1]
    assert [r.req_id for r in sim.residencies] == [0]
