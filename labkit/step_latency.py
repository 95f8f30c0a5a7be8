"""How long one decode step takes at each position, measured so that a busy machine cannot fake the answer.

Without a cache, the step that generates the token at position L runs the model over all L tokens so far, so
timing one forward pass over L tokens *is* timing that step (notebook 01). A single timing per position on a
shared CPU is mostly noise: another learner's kernel, a context switch, a frequency change. So:

    for repeat in 1..R:                      # round-robin: a burst of load hits every length alike
        for L in lengths (shuffled):
            time model(tokens[:L])           # one thread (labkit.device.threads(1)): no waiting on a busy core
    per L: median of the R timings, and the spread between the 25th and 75th percentiles

and ``verdict`` says whether the rise from the shortest to the longest context stands clear of that spread.
``python -m labkit.bench step_latency`` records the same measurement on a quiet machine
(data/bench/step_latency.json); notebook 01 draws the live medians over that recording.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from labkit.device import threads

DEFAULT_LENGTHS = tuple(range(16, 497, 32))  # 16 .. 496: the shipped model's context is 512


@dataclasses.dataclass
class LatencyCurve:
    """Step times (ms) of R repeats at each context length; ``samples[r][i]`` is repeat r at ``lengths[i]``."""

    lengths: list[int]
    samples: list[list[float]]
    threads: int
    source: str  # e.g. "measured live on this CPU" or "recorded on <machine>, <date>"

    def _quantile(self, q: float) -> list[float]:
        t = torch.tensor(self.samples, dtype=torch.float64)  # (R, n)
        return torch.quantile(t, q, dim=0).tolist()

    @property
    def median(self) -> list[float]:
        return self._quantile(0.5)

    @property
    def q25(self) -> list[float]:
        return self._quantile(0.25)

    @property
    def q75(self) -> list[float]:
        return self._quantile(0.75)

    def slope_ms_per_token(self) -> float:
        """Least-squares slope of the medians against the context length."""
        x = torch.tensor(self.lengths, dtype=torch.float64)
        y = torch.tensor(self.median, dtype=torch.float64)
        xc = x - x.mean()
        return float((xc * (y - y.mean())).sum() / (xc * xc).sum())

    def to_dict(self) -> dict:
        return {"lengths": self.lengths, "samples_ms": self.samples, "threads": self.threads,
                "median_ms": self.median, "q25_ms": self.q25, "q75_ms": self.q75,
                "slope_ms_per_token": self.slope_ms_per_token()}


@torch.no_grad()
def measure(model, token_ids, lengths=DEFAULT_LENGTHS, repeats: int = 5, num_threads: int = 1,
            seed: int = 0, source: str = "measured live on this CPU") -> LatencyCurve:
    """Time one no-cache forward over the first L of ``token_ids`` for every L in ``lengths``, ``repeats`` times,
    round-robin in a shuffled order, with ``num_threads`` torch threads. One warm-up pass comes first."""
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"lengths must be positive token counts, got {lengths}")
    if max(lengths) > len(token_ids):
        raise ValueError(f"the longest length ({max(lengths)}) needs that many tokens; token_ids has "
                         f"{len(token_ids)}: pass a longer text or shorter lengths")
    if repeats < 3:
        raise ValueError(f"repeats={repeats}: a median and a spread need at least 3 repeats")
    device = next(model.parameters()).device
    ids = torch.as_tensor(token_ids[: max(lengths)], dtype=torch.long, device=device)[None]
    gen = torch.Generator().manual_seed(seed)
    samples = [[0.0] * len(lengths) for _ in range(repeats)]
    with threads(num_threads):
        model(ids[:, : lengths[0]])  # warm-up: first-call allocations are not a step's cost
        for r in range(repeats):
            for i in torch.randperm(len(lengths), generator=gen).tolist():
                start = time.perf_counter()
                model(ids[:, : lengths[i]])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                samples[r][i] = 1e3 * (time.perf_counter() - start)
    return LatencyCurve(lengths, samples, num_threads, source)


def from_record(record: dict) -> LatencyCurve:
    """The curve saved by ``python -m labkit.bench step_latency``."""
    prov = record["provenance"]
    where = record.get("cpu") or prov["device"]
    load = record.get("loadavg_1min")
    note = f", load average {load:.1f} on {record.get('cpu_count')} cores" if load is not None else ""
    return LatencyCurve(record["lengths"], record["samples_ms"], record["threads"],
                        f"recorded on {where} ({prov['date'][:10]}{note})")


def recorded() -> tuple[LatencyCurve | None, str]:
    """(the recorded curve, a line saying where it comes from), or (None, how to record it)."""
    from labkit.bench import record

    try:
        return (curve := from_record(record.load("step_latency"))), curve.source
    except FileNotFoundError:
        return None, "no recorded reference: run `python -m labkit.bench step_latency` on a quiet machine"


def verdict(curve: LatencyCurve) -> tuple[bool, str]:
    """(clear, sentence): is the rise from the shortest to the longest context larger than the noise?

    The noise is the median over lengths of the interquartile spread; the rise is the fitted slope times the
    range of lengths. "Clear" needs the rise to be at least three times the noise.
    """
    rise = curve.slope_ms_per_token() * (curve.lengths[-1] - curve.lengths[0])
    spreads = sorted(hi - lo for lo, hi in zip(curve.q25, curve.q75))
    noise = spreads[len(spreads) // 2]
    clear = rise > 3 * noise
    if clear:
        return True, (f"{curve.source}: the step time rises by {rise:.1f} ms from {curve.lengths[0]} to "
                      f"{curve.lengths[-1]} tokens ({curve.slope_ms_per_token() * 100:.2f} ms per 100 tokens), "
                      f"well above the run-to-run spread ({noise:.1f} ms).")
    return False, (f"{curve.source}: too noisy to show the trend: a rise of {rise:.1f} ms from {curve.lengths[0]} "
                   f"to {curve.lengths[-1]} tokens against a run-to-run spread of {noise:.1f} ms. This machine is "
                   "busy; read the trend from the recorded reference, or run the cell again when it is quieter.")


def latency_figure(live: LatencyCurve, reference: LatencyCurve | None = None, title: str | None = None):
    """Live medians with their 25-75% spread as error bars, and the recorded reference's medians as a line."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if reference is not None:
        fig.add_scatter(x=reference.lengths, y=reference.median, mode="lines", name=f"reference: {reference.source}",
                        line=dict(color="grey", dash="dash"))
    med = live.median
    fig.add_scatter(x=live.lengths, y=med, mode="markers", name=f"median of {len(live.samples)} runs: {live.source}",
                    error_y=dict(type="data", symmetric=False, array=[hi - m for hi, m in zip(live.q75, med)],
                                 arrayminus=[m - lo for lo, m in zip(live.q25, med)]))
    fig.update_layout(title=title or f"One step without a KV cache: time against context ({live.threads} thread; "
                                     "bars: 25-75% of the runs)",
                      xaxis_title="tokens the step runs over (= position of the token it generates)",
                      yaxis_title="step time (ms)", height=420, legend=dict(orientation="h", y=-0.25))
    return fig


def step_time_figure(runs: dict, first_position: int, title: str):
    """Per-step time of whole generations (``labkit.generate.Generation`` by name), prefill left out."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, run in runs.items():
        steps = run.step_seconds[1:]
        fig.add_scatter(x=[first_position + 1 + i for i in range(len(steps))], y=[1e3 * s for s in steps],
                        mode="markers", name=name)
    fig.update_layout(title=title, xaxis_title="position of the token being generated", yaxis_title="step time (ms)")
    return fig
