"""The engine's KV pool, as notebooks 02 and 04 measure it: contiguous placement (first fit, reservation
policies, external fragmentation), refusal without side effects, and per-step accounting that adds up."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import labkit  # noqa: F401
from labkit.engine import EngineConfig, SamplingParams, Sequence
from labkit.engine.block_manager import EngineBlockManager
from labkit.engine.policies import can_admit
from labkit.fragmentation import engine_config
from labkit.paged import NoFreeBlocksError
from labkit.pool_history import CATEGORIES, replay
from labkit.traces import Request, Trace


def req(i, prompt, output, cap=None, arrival=0.0):
    return Request(i, arrival, prompt, output, output if cap is None else cap)


def trace_of(*requests, max_len=2048):
    return Trace(tuple(requests), preset="hand-made", rate=float("inf"), seed=0, max_len=max_len)


def seq(i, prompt_len, max_tokens):
    return Sequence(i, [1] * prompt_len, SamplingParams(max_tokens=max_tokens))


def contiguous(num_blocks, block_size=1, reserve="max_new_tokens", max_model_len=100):
    return EngineBlockManager(num_blocks, block_size, allocation="contiguous", reserve=reserve,
                              max_model_len=max_model_len)


def test_reservation_per_policy():
    s = seq(0, 10, 50)  # will really produce 20 tokens
    assert contiguous(1000, reserve="max_len").blocks_to_reserve(s) == 100
    assert contiguous(1000, reserve="max_new_tokens").blocks_to_reserve(s) == 60
    oracle = contiguous(1000, reserve="oracle")
    with pytest.raises(ValueError, match="oracle"):
        oracle.blocks_to_reserve(s)
    oracle.oracle = lambda q: q.num_prompt_tokens + 20 - 1
    assert oracle.blocks_to_reserve(s) == 29
    assert contiguous(1000, block_size=16, reserve="max_new_tokens").blocks_to_reserve(s) == 4  # 60 tokens
    assert EngineBlockManager(100, 16).blocks_to_reserve(s) == 0  # paged reserves nothing


def test_first_fit_reuses_the_first_gap_that_is_big_enough():
    bm = contiguous(100)
    a, b, c = seq(0, 10, 10), seq(1, 20, 10), seq(2, 5, 5)
    for s in (a, b, c):
        bm.allocate(s, s.num_prompt_tokens)
    assert [bm.runs[i] for i in range(3)] == [(0, 20), (20, 30), (50, 10)]
    assert a.block_table == list(range(20))
    bm.free(a)
    bm.free(c)
    assert bm.free_runs() == [(0, 20), (50, 50)]
    d, e = seq(3, 20, 5), seq(4, 10, 5)
    assert bm.can_place(d, 20) and bm.can_place(e, 10)
    bm.allocate(d, 20)  # 25 slots: the gap at 0 is too small
    bm.allocate(e, 10)  # 15 slots: the first gap fits
    assert bm.runs[3] == (50, 25) and bm.runs[4] == (0, 15)
    assert bm.free_runs() == [(15, 5), (75, 25)]
    assert not bm.can_place(seq(5, 20, 10), 20)  # 30 free slots, but no gap of 30: external fragmentation
    assert bm.num_used_slots() == 20 + 20 + 10 and bm.num_free_blocks == 30  # slots filled, not reserved


def test_a_full_pool_says_so_and_changes_nothing():
    bm = contiguous(64)
    bm.allocate(seq(0, 40, 10), 40)
    before = (dict(bm.runs), bm.bm.allocator.free_block_ids(), list(bm.ref_count))
    with pytest.raises(NoFreeBlocksError, match="no run of 50 consecutive free blocks"):
        bm.allocate(seq(1, 40, 10), 40)
    assert (dict(bm.runs), bm.bm.allocator.free_block_ids(), list(bm.ref_count)) == before


def test_contiguous_append_stays_inside_the_reservation():
    bm = contiguous(100)
    s = seq(0, 3, 2)
    bm.allocate(s, 3)
    s.num_computed_tokens = 3
    bm.append_slots(s, 2)
    assert bm.num_live_tokens(s) == 5
    with pytest.raises(RuntimeError, match="outgrew its contiguous reservation"):
        bm.append_slots(s, 3)


def test_a_reservation_larger_than_the_pool_is_refused_up_front():
    sim = replay(trace_of(req(0, 5, 5)), engine_config("contiguous", 1024, reserve="max_len"))
    assert sim.num_steps == 0 and "reserves 2048 blocks" in sim.refused[0][1]
    sim = replay(trace_of(req(0, 10, 10), req(1, 10, 200), max_len=300),
                 engine_config("contiguous", 100, reserve="oracle"))
    assert [rid for rid, _ in sim.refused] == [1] and "could never finish" in sim.refused[0][1]
    assert [r.req_id for r in sim.residencies] == [0]


def test_config_refuses_reserve_for_a_paged_pool():
    with pytest.raises(ValueError, match="contiguous allocator"):
        EngineConfig(allocation="paged", reserve="max_len")
    with pytest.raises(ValueError, match="reserve must be one of"):
        EngineConfig(allocation="contiguous", reserve="all")


def test_one_request_accounting_step_by_step():
    # prompt 5, output 3, reservation max_len 16: fills 5, 6, 7 slots over its 3 steps (its last token is
    # returned, not stored)
    sim = replay(trace_of(req(0, 5, 3, cap=11), max_len=16), engine_config("contiguous", 32, reserve="max_len"))
    assert list(sim.counts["used"]) == [5, 6, 7]
    assert list(sim.counts["reserved"]) == [2, 1, 0]
    assert list(sim.counts["internal"]) == [9, 9, 9]
    assert list(sim.counts["free"]) == [16, 16, 16]
    sim = replay(trace_of(req(0, 5, 3, cap=11), max_len=16), engine_config("contiguous", 32, reserve="oracle"))
    assert list(sim.counts["internal"]) == [0, 0, 0] and list(sim.counts["reserved"]) == [2, 1, 0]


def test_paged_pool_counts_partial_blocks():
    cfg = engine_config("paged", 32, block_size=4)
    sim = replay(trace_of(req(0, 5, 3), max_len=16), cfg)
    # 5 tokens -> 2 blocks (8 slots): 2 reserved (it will fill 7); then 6 -> 1; 7 -> 0 reserved, 1 internal
    assert list(sim.counts["used"]) == [5, 6, 7]
    assert list(sim.counts["reserved"]) == [2, 1, 0]
    assert list(sim.counts["internal"]) == [1, 1, 1]
    assert list(sim.counts["free"]) == [24, 24, 24]


requests = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40), st.floats(0, 2)), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(requests, st.sampled_from(["max_len", "max_new_tokens", "oracle", "paged4", "paged16", "paged4w"]))
def test_accounting_adds_up_and_everyone_finishes(spec, policy):
    reqs = tuple(req(i, p, o, cap=o + 5, arrival=a) for i, (p, o, a) in enumerate(sorted(spec, key=lambda s: s[2])))
    trace = trace_of(*reqs, max_len=96)
    if policy == "paged4w":  # a large watermark: a lone request must still be admitted
        cfg = engine_config("paged", 128, block_size=4, watermark=0.5)
    elif policy.startswith("paged"):
        cfg = engine_config("paged", 128, block_size=int(policy[5:]))
    else:
        cfg = engine_config("contiguous", 128, reserve=policy)
    sim = replay(trace, cfg)
    total = sum(sim.counts[c] for c in CATEGORIES)
    assert (total == sim.capacity).all()
    assert all((sim.counts[c] >= 0).all() for c in CATEGORIES)
    finished = [r.req_id for r in sim.residencies if not r.preempted]
    assert sorted(finished) == [r.req_id for r in reqs]  # everyone finishes exactly once
    for res in sim.residencies:
        if not res.preempted:
            assert res.tokens[-1] == res.final_len == trace.requests[res.req_id].total_len - 1
    if policy == "oracle":
        assert (sim.counts["internal"] == 0).all()  # the oracle reserves exactly what it will fill
    if not policy.startswith("paged"):
        assert sim.num_preemptions == 0  # a reservation never runs out
        for t in range(sim.num_steps):  # runs of one step never overlap
            held = sorted((b, r.req_id) for r in sim.residencies if r.admit_step <= t <= r.end_step
                          for b in r.blocks_at(t))
            assert len({b for b, _ in held}) == len(held)


def test_paged_pool_preempts_when_blocks_run_out_and_still_finishes():
    sim = replay(trace_of(*(req(i, 10, 30) for i in range(4)), max_len=64), engine_config("paged", 64, block_size=4))
    assert sim.num_preemptions > 0
    assert sorted(r.req_id for r in sim.residencies if not r.preempted) == [0, 1, 2, 3]
    assert any(r.preempted for r in sim.residencies)
    assert sim.counts["used"].max() <= 64


def test_admission_keeps_the_watermark_free_except_in_an_empty_pool():
    assert can_admit(90, 100, num_running=0, watermark_blocks=10, max_num_seqs=8)  # empty: no watermark
    assert can_admit(89, 99, num_running=1, watermark_blocks=10, max_num_seqs=8)  # 10 left
    assert not can_admit(90, 99, num_running=1, watermark_blocks=10, max_num_seqs=8)  # 9 left
    assert not can_admit(1, 99, num_running=8, watermark_blocks=0, max_num_seqs=8)  # no batch slot


def test_a_request_waits_for_a_gap_large_enough_not_just_enough_free_blocks():
    # 12 slots, oracle reservations (prompt + output - 1): A [0, 4) for 1 step, B [4, 10) for 6, C [10, 12) for 2.
    # D needs 5: after C leaves 6 slots are free, but in gaps of 4 and 2, so D waits until B has left
    reqs = [req(0, 4, 1), req(1, 1, 6), req(2, 1, 2), req(3, 3, 3)]
    sim = replay(trace_of(*reqs, max_len=12), engine_config("contiguous", 12, reserve="oracle"))
    stays = {r.req_id: r for r in sim.residencies}
    assert [stays[i].blocks_at(0)[0] for i in range(3)] == [0, 4, 10]
    assert stays[2].end_step < stays[1].end_step < stays[3].admit_step
    assert sim.counts["external"][stays[2].end_step + 1] == 6  # free, but useless to D
