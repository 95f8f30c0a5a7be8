"""Worked solutions for notebook 01."""
import torch


def causal_mask(T):
    i = torch.arange(T)
    return i[None, :] <= i[:, None]  # key j visible from query i when j <= i


def top_k_filter(logits, k):
    order = torch.argsort(logits, descending=True)
    out = torch.full_like(logits, float("-inf"))
    out[order[:k]] = logits[order[:k]]
    return out


def recomputed_tokens(prompt_len, new_tokens):
    # arithmetic series: prompt_len, prompt_len + 1, ..., prompt_len + new_tokens - 1
    return new_tokens * prompt_len + new_tokens * (new_tokens - 1) // 2
