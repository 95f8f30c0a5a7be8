"""Notebook 07 exercises: whom to preempt, preemption by recompute, and what each way of preempting costs.

``choose_victim`` and ``preempt_by_recompute`` plug into the engine's scheduler (``Scheduler.choose_victim``,
``Scheduler.preempt_by_recompute``): the check runs ``LLMEngine`` with a tiny random model on a pool too small
for its requests, once with the learner's function and once with the package's, and compares every request's
tokens, who was preempted at each step, the waiting queue and the pool at the end. ``choose_victim`` is also
called directly on lists with tied arrival times.
"""
from __future__ import annotations

import random

import torch

from labkit.engine import EngineConfig, LLMEngine, SamplingParams, Sequence
from labkit.engine.policies import choose_victim as _choose_victim
from labkit.engine.scheduler import preempt_by_recompute as _preempt_by_recompute
from labkit.exercises import Exercise
from labkit.exercises.nb06 import tiny_llama
from labkit.paged import blocks_needed


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _engine_case(gen):
    rng = random.Random(_int(gen, 0, 2**31))
    block_size = rng.choice([2, 4])
    reqs = [([rng.randrange(64) for _ in range(rng.randint(2, 12))], rng.randint(4, 14), float(rng.randint(0, 3)))
            for _ in range(rng.randint(3, 6))]
    longest = max(len(p) + n for p, n, _ in reqs)
    num_blocks = blocks_needed(longest, block_size) + rng.randint(0, 3)  # tight: preemptions happen
    return reqs, block_size, num_blocks, rng.randint(0, 2)


def _serve(reqs, block_size, num_blocks, seed, plug) -> dict:
    """Run the engine (recompute) with ``plug(scheduler)`` applied; record tokens, preemptions and queues."""
    from labkit.side_channel import one_thread

    cfg = EngineConfig(num_blocks=num_blocks, block_size=block_size, preemption="recompute", watermark=0.0,
                       max_num_batched_tokens=16)
    engine = LLMEngine(tiny_llama(seed), cfg, eos_token_ids=())
    plug(engine.scheduler)
    seqs = [engine.add_request(p, SamplingParams(max_tokens=n), arrival_s=t) for p, n, t in reqs]
    out = {}
    try:
        with one_thread():
            for step in range(400):
                if not engine.has_unfinished():
                    break
                engine.step()
                rec = engine.history[-1]
                if rec.preempted:
                    out[f"step {step}: preempted"] = list(rec.preempted)
                    out[f"step {step}: waiting queue after"] = [s.seq_id for s in engine.scheduler.waiting]
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001  (the error is part of the behaviour compared)
        out["engine error"] = f"{type(e).__name__}: {e}"[:200]
        return out
    for s in seqs:
        out[f"request {s.seq_id}: output tokens"] = s.output_token_ids
    out["unfinished requests"] = [s.seq_id for s in seqs if not s.is_finished]
    out["free blocks at the end"] = engine.block_manager.num_free_blocks
    return out


def _victim_inputs(gen):
    lists = []
    for _ in range(10):  # direct calls: few distinct arrival times, so ties happen
        n = _int(gen, 1, 7)
        arrivals = torch.randint(0, 4, (n,), generator=gen).tolist()
        ids = torch.randperm(100, generator=gen)[:n].tolist()
        lists.append([(float(a), i) for a, i in zip(arrivals, ids)])
    return lists, _engine_case(gen)


def _drive_victim(choose_victim, lists, engine_case) -> dict:
    out = {}
    for i, pairs in enumerate(lists):
        candidates = [Sequence(seq_id, [1], arrival_s=a) for a, seq_id in pairs]
        got = choose_victim(list(candidates))
        out[f"call {i} on (arrival_s, seq_id) {pairs}"] = got.seq_id if isinstance(got, Sequence) else repr(got)

    def plug(scheduler):
        scheduler.choose_victim = choose_victim

    out.update(_serve(*engine_case, plug))
    return out


def _recompute_inputs(gen):
    return _engine_case(gen),


def _drive_recompute(preempt_by_recompute, engine_case) -> dict:
    def plug(scheduler):
        scheduler.preempt_by_recompute = preempt_by_recompute

    return _serve(*engine_case, plug)


def _preemption_cost(num_tokens: int, block_size: int, kv_bytes_per_token: int, flops_per_token: int):
    """(swap bytes out and back in: whole blocks move; recompute FLOPs: every token prefilled again)."""
    swap = 2 * blocks_needed(num_tokens, block_size) * block_size * kv_bytes_per_token
    return swap, num_tokens * flops_per_token


def _cost_inputs(gen):
    return _int(gen, 1, 4000), [1, 8, 16, 32][_int(gen, 0, 4)], _int(gen, 1, 1 << 18), _int(gen, 1, 1 << 34)


EXERCISES = {
    "choose_victim": Exercise(
        reference=_choose_victim, make_inputs=_victim_inputs, harness=_drive_victim, trials=6,
        spec="choose_victim(candidates: list[Sequence]) -> Sequence: the one FCFS preempts first, the latest "
             "arrival (largest arrival_s), ties broken by the larger seq_id. It runs inside the engine."),
    "preempt_by_recompute": Exercise(
        reference=_preempt_by_recompute, make_inputs=_recompute_inputs, harness=_drive_recompute, trials=6,
        spec="preempt_by_recompute(seq, block_manager, waiting): free seq's blocks (block_manager.free(seq)), "
             "forget its K/V (num_computed_tokens = 0), mark it WAITING and put it back in the waiting deque so "
             "that the deque stays in (arrival_s, seq_id) order. It runs inside the engine."),
    "preemption_cost": Exercise(
        reference=_preemption_cost, make_inputs=_cost_inputs,
        spec="(bytes a swap moves out and back in, counting whole blocks; FLOPs to recompute every token)."),
}
