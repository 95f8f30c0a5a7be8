"""Notebook 07 exercises: whom to preempt, and what each way of preempting costs."""
import torch

from labkit.exercises import Exercise
from labkit.paged import blocks_needed


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _choose_victim(running: list[tuple[float, int]]) -> int:
    """FCFS priority: the latest arrival (ties: the larger request id) is preempted first."""
    return max(running)[1]


def _victim_inputs(gen):
    n = _int(gen, 1, 8)
    arrivals = torch.randint(0, 5, (n,), generator=gen).tolist()  # few values: ties happen
    ids = torch.randperm(100, generator=gen)[:n].tolist()
    return [(float(a), i) for a, i in zip(arrivals, ids)],


def _preemption_cost(num_tokens: int, block_size: int, kv_bytes_per_token: int, flops_per_token: int):
    """(swap bytes out and back in: whole blocks move; recompute FLOPs: every token prefilled again)."""
    swap = 2 * blocks_needed(num_tokens, block_size) * block_size * kv_bytes_per_token
    return swap, num_tokens * flops_per_token


def _cost_inputs(gen):
    return _int(gen, 1, 4000), [1, 8, 16, 32][_int(gen, 0, 4)], _int(gen, 1, 1 << 18), _int(gen, 1, 1 << 34)


EXERCISES = {
    "choose_victim": Exercise(
        reference=_choose_victim, make_inputs=_victim_inputs,
        spec="running = [(arrival_s, req_id), ...]; return the req_id FCFS preempts: latest arrival, "
             "ties broken by the larger req_id."),
    "preemption_cost": Exercise(
        reference=_preemption_cost, make_inputs=_cost_inputs,
        spec="(bytes a swap moves out and back in, counting whole blocks; FLOPs to recompute every token)."),
}
