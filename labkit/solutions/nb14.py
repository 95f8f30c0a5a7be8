"""Worked solutions for notebook 14."""
import math

import torch


def expected_experts_touched(batch, num_experts, top_k):
    # one token leaves a given expert out with probability 1 - k/E; B independent tokens all leave it out
    # with probability (1 - k/E)^B; sum over the E experts
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def token_choice_kept(router_logits, top_k, capacity_factor):
    n, e = router_logits.shape
    choices = torch.topk(torch.softmax(router_logits.float(), -1), top_k, dim=-1).indices  # (N, k)
    cap = max(1, math.ceil(capacity_factor * n * top_k / e))
    used = [0] * e
    kept = torch.zeros(n, e, dtype=torch.bool)
    for r in range(top_k):  # all first choices, in token order, then all second choices, ...
        for t in range(n):
            ex = int(choices[t, r])
            if used[ex] < cap:
                used[ex] += 1
                kept[t, ex] = True
    return kept
