"""The build-it exercises of notebooks 06 and 07 catch wrong answers, and say which output differs.

Each wrong solution here is a mistake a learner could make; run_trials must fail on it and point at the first
operation (or engine step) whose output differs."""
from __future__ import annotations

import pytest

import labkit  # noqa: F401
from labkit.engine.sequence import SequenceStatus
from labkit.exercises import run_trials
from labkit.exercises.nb06 import EXERCISES as NB06
from labkit.exercises.nb07 import EXERCISES as NB07
from labkit.prefix_cache import hash_block

pytestmark = pytest.mark.timeout(120)


# ---- 06: append_slot with copy-on-write -----------------------------------------------------------------
def append_no_cow(seq, allocator, copies):  # writes into a shared block: the other holders see its token
    if seq.num_tokens % seq.block_size == 0:
        seq.block_table.append(allocator.allocate())
    seq.num_tokens += 1
    return seq.slot(seq.num_tokens - 1)


def append_cow_keeps_reference(seq, allocator, copies):  # copies, but never drops its reference to the original
    if seq.num_tokens % seq.block_size == 0:
        seq.block_table.append(allocator.allocate())
    elif allocator.ref_count[seq.block_table[-1]] > 1:
        new = allocator.allocate()
        copies.append((seq.block_table[-1], new))
        seq.block_table[-1] = new
    seq.num_tokens += 1
    return seq.slot(seq.num_tokens - 1)


def append_counts_first(seq, allocator, copies):  # counts the token before it knows a block is free
    seq.num_tokens += 1
    if (seq.num_tokens - 1) % seq.block_size == 0:
        seq.block_table.append(allocator.allocate())
    elif allocator.ref_count[seq.block_table[-1]] > 1:
        new = allocator.allocate()
        allocator.free(seq.block_table[-1])
        copies.append((seq.block_table[-1], new))
        seq.block_table[-1] = new
    return seq.slot(seq.num_tokens - 1)


@pytest.mark.parametrize("wrong", [append_no_cow, append_cow_keeps_reference, append_counts_first])
def test_append_slot_catches(wrong):
    ok, msg = run_trials(wrong, NB06["append_slot"])
    assert not ok and "first difference at [\"op " in msg, msg


# ---- 06: prefix lookup -------------------------------------------------------------------------------------
def lookup(token_ids, block_size, cached, salt, *, limit=None, stop_at_miss=True, use_salt=True):
    hit, parent = [], None
    n = (len(token_ids) - 1) // block_size if limit is None else limit(len(token_ids), block_size)
    for i in range(n):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], salt if use_salt else None)
        if parent not in cached:
            if stop_at_miss:
                break
            continue
        hit.append(cached[parent])
    return hit


WRONG_LOOKUPS = {
    "includes the block of the last token": lambda t, b, c, s: lookup(t, b, c, s, limit=lambda n, bs: n // bs),
    "skips a miss and goes on": lambda t, b, c, s: lookup(t, b, c, s, stop_at_miss=False),
    "ignores the salt": lambda t, b, c, s: lookup(t, b, c, s, use_salt=False),
}


@pytest.mark.parametrize("name", list(WRONG_LOOKUPS))
def test_match_prefix_catches(name):
    ok, msg = run_trials(WRONG_LOOKUPS[name], NB06["match_prefix"])
    assert not ok and "first difference at [" in msg, msg


def test_match_prefix_wrong_hit_is_caught_by_the_engine_run_too():
    """Drop the direct lookups: the engine run alone must show a lookup that hits the last token's block."""
    import dataclasses

    ex = NB06["match_prefix"]
    engine_only = dataclasses.replace(ex, make_inputs=lambda g: (lambda c, q, b, e: (c, [], b, e))(*ex.make_inputs(g)))
    ok, msg = run_trials(WRONG_LOOKUPS["includes the block of the last token"], engine_only)
    assert not ok and "engine" in msg, msg


# ---- 07: victim choice and recompute, inside the engine -------------------------------------------------------
def earliest_arrival(candidates):
    return min(candidates, key=lambda s: (s.arrival_s, s.seq_id))


def no_tie_break(candidates):
    return max(candidates, key=lambda s: s.arrival_s)  # the first of the latest, not the largest id


@pytest.mark.parametrize("wrong", [earliest_arrival, no_tie_break])
def test_choose_victim_catches(wrong):
    ok, msg = run_trials(wrong, NB07["choose_victim"])
    assert not ok and "first difference at [" in msg, msg


def requeue_at_the_back(seq, block_manager, waiting):  # loses its place in the FCFS order
    block_manager.free(seq)
    seq.num_computed_tokens = 0
    seq.status = SequenceStatus.WAITING
    waiting.append(seq)


def forgets_to_free(seq, block_manager, waiting):  # its blocks stay taken: readmission cannot allocate
    seq.num_computed_tokens = 0
    seq.status = SequenceStatus.WAITING
    waiting.appendleft(seq)


def stays_running(seq, block_manager, waiting):  # freed and queued, but still marked RUNNING
    block_manager.free(seq)
    seq.num_computed_tokens = 0
    waiting.appendleft(seq)


@pytest.mark.parametrize("wrong", [requeue_at_the_back, forgets_to_free, stays_running])
def test_preempt_by_recompute_catches(wrong):
    ok, msg = run_trials(wrong, NB07["preempt_by_recompute"])
    assert not ok and "first difference at [" in msg, msg
