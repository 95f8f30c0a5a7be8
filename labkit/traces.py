"""Workload traces: who asks for how many tokens, and when.

A serving system's memory story depends on the requests it sees: how long the prompts are, how
long the answers run, how fast requests arrive. The vLLM paper (Kwon et al., SOSP 2023, arXiv
2309.06180, §6.1) took the prompt and output lengths of real datasets (ShareGPT, Alpaca) and drew
arrival times from a Poisson process. The lab ships no dataset, so this module draws the lengths
from distributions matching the paper's statistics, with seeded Poisson arrivals:

    trace = make_trace("sharegpt", num_requests=500, rate=20.0, seed=0, max_len=2048)
    trace.requests[0]   # Request(req_id=0, arrival_s=..., prompt_len=..., output_len=..., max_new_tokens=...)

Shape of the length distributions (our choice, not the paper's): a log-normal. Token counts are
positive and right-skewed (most chats are short, a few are very long), and a log-normal is the
simplest two-parameter shape with that form. Its mean is set to the paper's mean for the dataset;
its spread ``sigma`` is our assumption (the paper shows histograms, not a fitted spread), wider
for ShareGPT, whose lengths the paper says vary more than Alpaca's.

``requests_from_trace(trace, vocab_size)`` turns a trace into what the engine takes (``labkit.engine``:
prompt token ids, ``SamplingParams``, arrival time), keeping each request's true output length.

Clipping: a prompt keeps at most ``max_len - 1`` tokens and the answer at most what is left of
``max_len`` (and at most ``max_new_tokens``, the cap a client sends with its request), so every
request fits the model's context. (Benchmarks often drop such requests instead; clipping keeps
exactly ``num_requests``.) It pulls the sample mean a little below the preset's mean.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from labkit.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """A log-normal over token counts, given by its mean (before clipping) and the sigma of log-length."""

    mean: float
    sigma: float

    def __post_init__(self):
        if self.mean < 1 or self.sigma < 0:
            raise ValueError(f"LengthDist needs mean >= 1 and sigma >= 0, got mean={self.mean}, sigma={self.sigma}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        # E[exp(N(mu, s^2))] = exp(mu + s^2/2), so mu = ln(mean) - s^2/2 hits the mean.
        mu = math.log(self.mean) - self.sigma**2 / 2
        x = rng.lognormal(mu, self.sigma, size=n) if self.sigma > 0 else np.full(n, self.mean)
        return np.maximum(1, np.rint(x)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class TracePreset:
    """A named workload: length distributions and where their parameters come from."""

    name: str
    prompt: LengthDist
    output: LengthDist
    source: str


PRESETS: dict[str, TracePreset] = {
    "sharegpt": TracePreset(
        name="sharegpt",
        prompt=LengthDist(mean=161, sigma=1.0),
        output=LengthDist(mean=338, sigma=1.0),
        source="ShareGPT conversations: mean prompt ~161 and output ~338 tokens (vLLM paper, Kwon et al. 2023, "
        "Fig. 11); log-normal spread sigma=1.0 is our assumption.",
    ),
    "alpaca": TracePreset(
        name="alpaca",
        prompt=LengthDist(mean=19, sigma=0.6),
        output=LengthDist(mean=58, sigma=0.6),
        source="Alpaca instructions: mean prompt ~19 and output ~58 tokens (vLLM paper, Kwon et al. 2023, "
        "Fig. 11); log-normal spread sigma=0.6 is our assumption (the paper: less variance than ShareGPT).",
    ),
}


@dataclasses.dataclass(frozen=True)
class Request:
    """One request of a trace. ``output_len`` is how many tokens it will really generate (known to
    the simulator, not to the server); ``max_new_tokens`` is the cap the client asked for."""

    req_id: int
    arrival_s: float
    prompt_len: int
    output_len: int
    max_new_tokens: int

    def __post_init__(self):
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"request {self.req_id}: prompt_len and output_len must be >= 1")
        if self.output_len > self.max_new_tokens:
            raise ValueError(
                f"request {self.req_id}: output_len {self.output_len} exceeds its max_new_tokens {self.max_new_tokens}"
            )

    @property
    def total_len(self) -> int:
        """Token slots the request holds when it finishes: prompt plus every generated token."""
        return self.prompt_len + self.output_len


@dataclasses.dataclass(frozen=True)
class Trace:
    """A list of requests sorted by arrival, with the parameters that made it."""

    requests: tuple[Request, ...]
    preset: str
    rate: float
    seed: int
    max_len: int

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):
        return iter(self.requests)

    def summary(self) -> dict:
        p = np.array([r.prompt_len for r in self.requests])
        o = np.array([r.output_len for r in self.requests])
        return {
            "preset": self.preset,
            "num_requests": len(self.requests),
            "rate_per_s": self.rate,
            "max_len": self.max_len,
            "prompt_mean": float(p.mean()),
            "output_mean": float(o.mean()),
            "prompt_max": int(p.max()),
            "output_max": int(o.max()),
            "duration_s": self.requests[-1].arrival_s if self.requests else 0.0,
        }


def make_trace(
    preset: str | TracePreset = "sharegpt",
    num_requests: int = 300,
    rate: float = 10.0,
    seed: int = 0,
    max_len: int = 2048,
    max_new_tokens: int | None = None,
) -> Trace:
    """A seeded synthetic trace.

    Args:
        preset: a name in ``PRESETS`` or a ``TracePreset``.
        num_requests: how many requests.
        rate: mean arrivals per second (Poisson process: exponential gaps of mean ``1/rate``);
            ``float('inf')`` makes every request arrive at time 0.
        seed: same seed, same trace.
        max_len: the model's context length; requests are clipped to fit it (see module docstring).
        max_new_tokens: the cap each client sends; ``None`` means "whatever the context leaves"
            (``max_len - prompt_len``). Outputs are clipped to it.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown trace preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    if num_requests < 0 or not rate > 0:
        raise ValueError(f"need num_requests >= 0 and rate > 0, got {num_requests}, {rate}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (one prompt token and one output token), got {max_len}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}")

    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=num_requests) if math.isfinite(rate) else np.zeros(num_requests)
    arrivals = np.cumsum(gaps)
    prompts = np.minimum(preset.prompt.sample(rng, num_requests), max_len - 1)
    caps = max_len - prompts if max_new_tokens is None else np.minimum(max_new_tokens, max_len - prompts)
    outputs = np.minimum(preset.output.sample(rng, num_requests), caps)
    requests = tuple(
        Request(i, float(arrivals[i]), int(prompts[i]), int(outputs[i]), int(caps[i])) for i in range(num_requests)
    )
    return Trace(requests=requests, preset=preset.name, rate=rate, seed=seed, max_len=max_len)


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    """One trace request as the engine takes it: ``engine.add_request(r.prompt_token_ids, r.params,
    request_id=r.request_id, arrival_s=r.arrival_s)``. ``output_len`` is how many tokens it really produces."""

    request_id: int
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_s: float
    output_len: int


def requests_from_trace(trace: Trace, vocab_size: int, *, seed: int = 0, scale: float = 1.0,
                        max_new_tokens: int | None = None, client_cap: bool = False) -> list[TraceRequest]:
    """The trace's requests with random prompt token ids of the trace's lengths.

    ``client_cap=False``: ``max_tokens`` is the true output length and EOS is ignored, so a request
    produces exactly its trace length whatever the model says (live runs on a real model).
    ``client_cap=True``: ``max_tokens`` is the client's cap (the trace's ``max_new_tokens``) and the
    request is meant to end earlier, at ``output_len``, with an EOS: what a contiguous cache that
    reserves prompt + max_tokens wastes (a ``SimulatedRunner(output_lens=...)`` ends it there).
    ``scale`` shrinks every length (at least 1 token each) for small CPU runs, keeping their spread;
    ``max_new_tokens`` caps the outputs after scaling.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}")
    gen = np.random.default_rng(seed)
    out = []
    for r in trace.requests:
        prompt_len = max(1, round(r.prompt_len * scale))
        n_out = max(1, round(r.output_len * scale))
        cap = max(n_out, round(r.max_new_tokens * scale))
        if max_new_tokens is not None:
            n_out, cap = min(n_out, max_new_tokens), min(cap, max_new_tokens)
        prompt = tuple(int(t) for t in gen.integers(0, vocab_size, prompt_len))
        params = SamplingParams(max_tokens=cap) if client_cap else SamplingParams(max_tokens=n_out, ignore_eos=True)
        out.append(TraceRequest(r.req_id, prompt, params, r.arrival_s, n_out))
    return out
