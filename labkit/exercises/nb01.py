"""Notebook 01 exercises: what generation without a cache computes."""
import torch

from labkit.exercises import Exercise


def _causal_mask(T: int) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()


def _top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def _recomputed_tokens(prompt_len: int, new_tokens: int) -> int:
    # step i runs the model over prompt_len + i tokens
    return sum(prompt_len + i for i in range(new_tokens))


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _top_k_inputs(gen):
    n = _int(gen, 5, 50)
    k = [1, n, _int(gen, 1, n + 1)][_int(gen, 0, 3)]  # the edges (keep one, keep all) and anything between
    return torch.randn(n, generator=gen) * 5, k


EXERCISES = {
    "causal_mask": Exercise(
        reference=_causal_mask, make_inputs=lambda g: (_int(g, 1, 12),),
        spec="(T, T) bool tensor, True where query i may look at key j (j <= i).",
        hints=("Row i is the query, column j the key: the allowed entries form the lower triangle.",
               "torch.tril(torch.ones(T, T, dtype=torch.bool)) is that triangle.")),
    "top_k_filter": Exercise(
        reference=_top_k_filter, make_inputs=_top_k_inputs,
        spec="keep the k largest logits, set every other one to -inf (return a new tensor of the same shape).",
        hints=("torch.topk(logits, k).values holds the k largest; the smallest of them, values[-1], is the cut-off.",
               "logits.masked_fill(logits < cutoff, float('-inf')) keeps everything at or above the cut-off.")),
    "recomputed_tokens": Exercise(
        reference=_recomputed_tokens, make_inputs=lambda g: (_int(g, 1, 500), _int(g, 1, 300)),
        spec="how many token positions the model processes to generate new_tokens tokens without a cache.",
        hints=("Step 0 runs the model over the prompt (prompt_len positions); step i over prompt_len + i.",
               "Add them up for i = 0 .. new_tokens - 1: new_tokens * prompt_len + (0 + 1 + ... + new_tokens - 1).")),
}
