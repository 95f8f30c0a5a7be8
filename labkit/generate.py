"""Autoregressive generation, one sequence at a time, with or without a KV cache.

    no cache:  step t runs the model over all t tokens again and keeps only the last logits
               (cost grows with position: notebook 01)
    cache:     prefill the prompt once, then each step feeds one token; K/V of earlier tokens are
               read from the cache (cost per token stays nearly flat: notebook 02)

Both paths pick tokens the same way, so with greedy decoding they must return the same tokens.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from labkit.kv_cache import KVCache
from labkit.sampling import SamplingParams, sample


@dataclasses.dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int]  # the new tokens only
    step_seconds: list[float]  # wall time of each step; step 0 is the prefill (time to first token)

    @property
    def ttft(self) -> float:
        return self.step_seconds[0]


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """Pick the next token from one row of logits (vocab,). temperature 0 means greedy (argmax);
    top_k 0/-1/None and top_p 1/None are off, as in Hugging Face. See :mod:`labkit.sampling`."""
    return sample(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), generator)


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, *, cache: KVCache | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_token_id: int | None = None,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` (a list or 1-D tensor of token ids).

    ``cache=None`` recomputes the whole sequence every step; pass a fresh KVCache for one sequence
    (e.g. ``ContiguousCache(model.config, batch_size=1)``) to reuse K/V instead.
    """
    prompt = [int(t) for t in (prompt_ids.tolist() if isinstance(prompt_ids, torch.Tensor) else prompt_ids)]
    if not prompt:
        raise ValueError("prompt_ids is empty: generation needs at least one token to start from")
    if len(prompt) + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"({model.config.max_position_embeddings}); shorten one of them"
        )
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    tokens, new, times = list(prompt), [], []
    for step in range(max_new_tokens):
        start = time.perf_counter()
        if cache is None:
            logits = model(torch.tensor([tokens], device=device))
        elif step == 0:
            logits = model(torch.tensor([tokens], device=device), cache=cache)
        else:
            pos = torch.tensor([[len(tokens) - 1]], device=device)
            logits = model(torch.tensor([[tokens[-1]]], device=device), pos, cache=cache)
        nxt = sample_next(logits[0, -1].cpu(), temperature, top_k, top_p, generator)
        times.append(time.perf_counter() - start)
        tokens.append(nxt)
        new.append(nxt)
        if on_token:
            on_token(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
    return Generation(prompt, new, times)
