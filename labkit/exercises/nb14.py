"""Notebook 14 exercises: experts a decode step touches, and which tokens a full expert drops."""
import torch

from labkit.exercises import Exercise
from labkit.moe import route_token_choice
from labkit.moe_amortisation import expected_experts_touched


def _touched_inputs(gen):
    e = int(torch.randint(2, 129, (1,), generator=gen))
    k = int(torch.randint(1, min(e, 8) + 1, (1,), generator=gen))
    return int(torch.randint(0, 300, (1,), generator=gen)), e, k


def _capacity_inputs(gen):
    n = int(torch.randint(1, 40, (1,), generator=gen))
    e = int(torch.randint(2, 9, (1,), generator=gen))
    k = int(torch.randint(1, e + 1, (1,), generator=gen))
    cf = [0.25, 0.5, 1.0, 1.25, 2.0][int(torch.randint(0, 5, (1,), generator=gen))]
    return torch.randn(n, e, generator=gen) * 2, k, cf


def _kept_ref(router_logits, top_k, capacity_factor):
    return route_token_choice(router_logits, top_k, capacity_factor).selected


EXERCISES = {
    "expected_experts_touched": Exercise(
        reference=expected_experts_touched, make_inputs=_touched_inputs, compare="allclose", atol=1e-9, rtol=1e-9,
        spec="batch B, num_experts E, top_k k -> the expected number of distinct experts B tokens touch when each "
             "picks a uniform random k-subset of the E experts (a float)."),
    "token_choice_kept": Exercise(
        reference=_kept_ref, make_inputs=_capacity_inputs,
        spec="router_logits (N, E), top_k k, capacity_factor cf -> (N, E) bool: expert e processes token t. Each "
             "token wants its top-k experts by softmax probability; each expert has C = ceil(cf * N * k / E) slots "
             "(at least 1), filled with every token's first choice in token order, then every second choice, ..."),
}
