"""Autoregressive generation, one sequence at a time, with or without a KV cache.

    no cache:  step t runs the model over all t tokens again and keeps only the last logits
               (cost grows with position: notebook 01)
    cache:     prefill the prompt once, then each step feeds one token; K/V of earlier tokens are
               read from the cache (cost per token stays nearly flat: notebook 02)

Both paths pick tokens the same way, so with greedy decoding they must return the same tokens.
"""
from __future__ import annotations

import dataclasses
import numbers
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


def check_token_ids(ids, vocab_size: int, what: str = "prompt_ids") -> list[int]:
    """``ids`` (a list or 1-D integer tensor) as a list of ints, each a token of a ``vocab_size`` vocabulary;
    the error names the first bad one, its position and the vocabulary size."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{what} must hold integer token ids, got a {ids.dtype} tensor")
        if ids.dim() > 1:
            raise ValueError(f"{what} must be one sequence (a list or 1-D tensor), got shape {tuple(ids.shape)}; "
                             "the engine (labkit.engine) serves batches")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{what} must be token ids, got text: encode it first (tokenizer.encode)")
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise ValueError(f"{what}[{i}] is {t!r}, not an integer token id")
        if not 0 <= t < vocab_size:
            raise ValueError(f"{what}[{i}] = {int(t)} is not a token of this model: ids run 0..{vocab_size - 1} "
                             f"(vocab_size {vocab_size})")
        out.append(int(t))
    return out


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, *, cache: KVCache | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_token_id: int | list[int] | None = None,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` after ``prompt_ids`` (a list or 1-D tensor of token ids).

    ``cache=None`` recomputes the whole sequence every step; pass a fresh KVCache for one sequence
    (e.g. ``ContiguousCache(model.config, batch_size=1)``) to reuse K/V instead. Sampling arguments mean
    what they mean in Hugging Face ``generate`` (:class:`labkit.sampling.SamplingParams` checks them);
    ``eos_token_id`` may be a list (Llama 3 instruct models stop on several ids). Everything is checked
    before the first forward pass, so a bad argument leaves ``cache`` untouched.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    params = SamplingParams(max_tokens=int(max_new_tokens), temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed)
    vocab = model.config.vocab_size
    prompt = check_token_ids(prompt_ids, vocab)
    stops = set(check_token_ids([] if eos_token_id is None else
                                eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id],
                                vocab, "eos_token_id"))
    if not prompt:
        raise ValueError("prompt_ids is empty: generation needs at least one token to start from")
    if len(prompt) + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
            f"({model.config.max_position_embeddings}); shorten one of them"
        )
    device = next(model.parameters()).device
    generator = params.make_generator()
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
        nxt = sample(logits[0, -1].cpu(), params, generator)
        times.append(time.perf_counter() - start)
        tokens.append(nxt)
        new.append(nxt)
        if on_token:
            on_token(nxt)
        if nxt in stops:
            break
    return Generation(prompt, new, times)
