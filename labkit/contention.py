"""What sharing one device costs: two engines stepping on it, alone, time-sliced, or side by side.

    alone        each engine runs its requests with the device to itself (the baseline)
    time-sliced  one thread alternates their steps: A.step(), B.step(), A.step(), ... Each step has the
                 whole device, but waits for the other's. This is what two processes get from a GPU
                 without MPS: the driver gives each context the GPU in turn.
    concurrent   two threads, one per engine, each on its own CUDA stream (on the CPU: its own core), so
                 their kernels may run at the same time. In one process that is what CUDA streams allow;
                 across processes it takes MPS (NVIDIA's Multi-Process Service). Whether it helps depends
                 on whether one engine alone leaves the device idle (small decode batches do).

Every run is bounded: a fixed workload each, and ``max_seconds``.
"""
from __future__ import annotations

import dataclasses
import threading
import time

import torch

from labkit.engine import SamplingParams

MODES = ("alone", "time-sliced", "concurrent")


@dataclasses.dataclass
class EngineRun:
    name: str
    seconds: float  # from the start of the run to this engine's last token
    steps: int
    step_seconds_mean: float
    output_tokens: int

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else float("nan")


def _load(engine, workload) -> list:
    return [engine.add_request(list(p), sp) for p, sp in workload]


def _drain(name, engine, seqs, t0, deadline, step_times, stream=None) -> EngineRun:
    n0 = len(step_times)
    ctx = torch.cuda.stream(stream) if stream is not None else None
    if ctx is not None:
        ctx.__enter__()
    try:
        while any(not s.is_finished for s in seqs):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"engine {name!r} did not finish its workload in time; give a smaller one")
            s0 = time.perf_counter()
            engine.step()
            step_times.append(time.perf_counter() - s0)
        if stream is not None:
            stream.synchronize()
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    took = step_times[n0:]
    return EngineRun(name, time.perf_counter() - t0, len(took), sum(took) / max(1, len(took)),
                     sum(s.num_output_tokens for s in seqs))


def run_contention(engines: dict, workloads: dict, mode: str, max_seconds: float = 120.0) -> dict:
    """Serve ``workloads[name]`` (a list of (prompt_ids, SamplingParams)) on ``engines[name]`` (two LLMEngines
    on one device) in ``mode``. Returns {"mode", "makespan_s", "runs": {name: EngineRun}}."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if set(engines) != set(workloads) or len(engines) != 2:
        raise ValueError(f"give two engines and a workload for each, got engines {sorted(engines)} and workloads "
                         f"{sorted(workloads)}")
    on_gpu = any(e.runner.device.type == "cuda" for e in engines.values() if hasattr(e.runner, "device"))
    t0 = time.perf_counter()
    deadline = t0 + max_seconds
    runs = {}
    if mode == "alone":
        for name, engine in engines.items():
            t = time.perf_counter()
            runs[name] = _drain(name, engine, _load(engine, workloads[name]), t, deadline, [])
    elif mode == "time-sliced":
        seqs = {n: _load(e, workloads[n]) for n, e in engines.items()}
        times = {n: [] for n in engines}
        done = {}
        while len(done) < len(engines):
            if time.perf_counter() > deadline:
                raise TimeoutError("time-sliced run did not finish in time; give smaller workloads")
            for name, engine in engines.items():
                if name in done:
                    continue
                s0 = time.perf_counter()
                engine.step()
                times[name].append(time.perf_counter() - s0)
                if all(s.is_finished for s in seqs[name]):
                    done[name] = time.perf_counter() - t0
        for name in engines:
            runs[name] = EngineRun(name, done[name], len(times[name]), sum(times[name]) / max(1, len(times[name])),
                                   sum(s.num_output_tokens for s in seqs[name]))
    else:
        seqs = {n: _load(e, workloads[n]) for n, e in engines.items()}
        errors = []

        def work(name):
            stream = torch.cuda.Stream() if on_gpu else None
            try:
                runs[name] = _drain(name, engines[name], seqs[name], t0, deadline, [], stream)
            except BaseException as exc:  # re-raised in the caller's thread below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in engines]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
    makespan = sum(r.seconds for r in runs.values()) if mode == "alone" else max(r.seconds for r in runs.values())
    return {"mode": mode, "makespan_s": makespan, "runs": runs}


def make_workload(vocab_size: int, num_requests: int, prompt_len: int, max_tokens: int, seed: int = 0) -> list:
    """``num_requests`` random prompts of ``prompt_len`` tokens, each generating exactly ``max_tokens``."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(1, vocab_size, (prompt_len,), generator=gen).tolist(),
             SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for _ in range(num_requests)]


def contention_rows(engines: dict, workloads: dict, max_seconds: float = 120.0) -> list[dict]:
    """One row per (mode, engine): seconds to finish, mean step time, tokens/s; plus the makespan."""
    rows = []
    for mode in MODES:
        res = run_contention(engines, workloads, mode, max_seconds)
        for name, r in res["runs"].items():
            rows.append({"mode": mode, "engine": name, "seconds": r.seconds, "steps": r.steps,
                         "step_ms": r.step_seconds_mean * 1e3, "output_tokens": r.output_tokens, "tok_s": r.tok_s,
                         "makespan_s": res["makespan_s"]})
    return rows


def contention_figure(rows: list[dict], title: str = "two engines on one device"):
    """Per mode: each engine's seconds to finish its workload and its mean step time."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    engines = list(dict.fromkeys(r["engine"] for r in rows))
    colors = ["#2a9d8f", "#e76f51", "#264653", "#e9c46a"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("seconds to finish its workload", "mean step time (ms)"))
    for i, name in enumerate(engines):
        mine = [r for r in rows if r["engine"] == name]
        for col, key in ((1, "seconds"), (2, "step_ms")):
            fig.add_trace(go.Bar(x=[r["mode"] for r in mine], y=[r[key] for r in mine], name=name,
                                 marker_color=colors[i % len(colors)], showlegend=col == 1), row=1, col=col)
    fig.update_layout(barmode="group", height=360, title=title)
    return fig
