"""How the next token is chosen: ``SamplingParams`` (vLLM's names, Hugging Face's meanings) and the sampler.

    logits (vocab,) --/ temperature --> top_k --> top_p --> softmax --> multinomial(seed) --> token
    temperature == 0: argmax (greedy), the other knobs are ignored

Meanings, as in HF ``generate`` and vLLM: ``top_k`` of 0 or -1 (or None) is off; ``top_p`` of 1.0 (or
None) is off; ``seed`` makes one request's samples reproducible whatever else is in the batch (each
request owns its own ``torch.Generator``). ``stop_token_ids`` end a request when sampled (the stop token
is kept in the output, as vLLM does for EOS); ``max_tokens`` caps the new tokens.

Both ``labkit.generate.generate`` (one sequence) and the engine (``labkit.engine``) pick tokens through
:func:`sample`, so with the same parameters they return the same tokens.
"""
from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["SamplingParams", "sample", "check_logits"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings; validated on construction (a clear ValueError names the field)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # True: the model's EOS does not end the request (benchmarks, fixed lengths)

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
                raise ValueError(f"top_k must be an integer >= 1, or 0 / -1 / None for off, got {self.top_k!r}")
        if self.top_p is not None:
            if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) \
                    or not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        stops = tuple(self.stop_token_ids)
        for t in stops:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r} in {list(stops)}")
        object.__setattr__(self, "stop_token_ids", stops)  # frozen: normalise a list to a tuple once

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def effective_top_k(self) -> int | None:
        return None if self.top_k in (None, 0, -1) else self.top_k

    @property
    def effective_top_p(self) -> float | None:
        return None if self.top_p in (None, 1, 1.0) else float(self.top_p)

    def check_vocab(self, vocab_size: int) -> None:
        """Stop ids must be tokens of this model."""
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary of {vocab_size} tokens")

    def make_generator(self) -> torch.Generator | None:
        """The request's own random stream (None when unseeded: torch's global stream)."""
        return torch.Generator().manual_seed(self.seed) if self.seed is not None else None


def check_logits(logits: torch.Tensor) -> None:
    """A row of logits with NaN cannot be sampled from: say so instead of returning garbage."""
    if torch.isnan(logits).any():
        raise FloatingPointError(
            "the model produced NaN logits; check the weights (a checkpoint with NaN, an fp16 overflow) "
            "or run in float32")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Pick the next token from one row of logits (vocab,) on the CPU."""
    check_logits(logits)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    top_k = params.effective_top_k
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top_p = params.effective_top_p
    if top_p is not None:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > top_p  # keep the smallest set whose mass reaches top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
