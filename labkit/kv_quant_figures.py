"""Notebook 09's figures and experiments: bytes per token, sequences per pool, requests running at once on the
engine with an fp16 or an int8 KV pool of the same bytes, and the recorded kernel timings.

The mechanisms are ``labkit.kv_quant`` (bytes, perplexity) and ``labkit/engine/kv_store_quant.py`` (the store).
"""
from __future__ import annotations

from labkit.kv_quant import kv_bytes_per_token, max_concurrent_sequences

__all__ = ["bytes_figure", "capacity_figure", "capacity_widget", "POOL_GIB", "running_requests",
           "running_figure", "bench_figure"]

POOL_GIB = (0.25, 0.5, 1, 2, 4, 8, 16, 24, 32, 40, 48, 64, 80, 96, 128)  # the slider's stops: no snapping


def _scale_bytes(cfg) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 4  # one fp32 scale per (token, KV head), K and V


def bytes_figure(models: dict, formats=("fp32", "fp16", "int8", "fp8")):
    """Bytes per token of each model in each format as % of its fp16 cache, values and scales stacked."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for part in ("values", "scales"):
        xs, ys = [], []
        for name, cfg in models.items():
            for f in formats:
                total = kv_bytes_per_token(cfg, f)
                scales = _scale_bytes(cfg) if f in ("int8", "fp8") else 0
                xs.append([name, f])
                ys.append(100 * (scales if part == "scales" else total - scales) / kv_bytes_per_token(cfg, "fp16"))
        fig.add_bar(x=list(zip(*xs)), y=ys, name=part)
    fig.update_layout(barmode="stack", title="KV bytes per token, as % of fp16 (computed from the configs)",
                      yaxis_title="% of the fp16 cache", height=360)
    return fig


def capacity_counts(cfg, pool_gib: float, seq_len: int, formats=("fp16", "int8", "fp8")) -> dict:
    return {f: max_concurrent_sequences(cfg, int(pool_gib * 2**30), seq_len, f) for f in formats}


def capacity_figure(models: dict, model: str, pool_gib: float, seq_len: int):
    """Sequences of ``seq_len`` tokens that fit in a paged pool of ``pool_gib`` GiB (block 16), per format; the
    title carries the exact values drawn."""
    import plotly.graph_objects as go

    n = capacity_counts(models[model], pool_gib, seq_len)
    fig = go.Figure(go.Bar(x=list(n), y=list(n.values()), text=list(n.values()), textposition="outside"))
    fig.update_layout(title=f"{model}: sequences of {seq_len} tokens in a {pool_gib:g} GiB paged pool (block 16): "
                            + ", ".join(f"{f} {v}" for f, v in n.items()),
                      yaxis_title="concurrent sequences", height=340)
    return fig


def capacity_widget(models: dict, model: str, pool_gib: float = 40, seq_len: int = 4096):
    """Model, pool and length controls over :func:`capacity_figure`. The pool slider stops exactly at
    :data:`POOL_GIB`, so the value shown is the value drawn."""
    import functools

    import ipywidgets as widgets

    from labkit.live_figure import LiveFigure

    return LiveFigure(functools.partial(capacity_figure, models),
                      model=widgets.Dropdown(options=list(models), value=model, description="model"),
                      pool_gib=widgets.SelectionSlider(options=list(POOL_GIB), value=pool_gib, description="pool GiB"),
                      seq_len=widgets.IntSlider(value=seq_len, min=256, max=32768, step=256, description="tokens/seq"))


def running_requests(pool_bytes: int, kv_format: str, num_requests: int = 200, rate: float = 50.0,
                     max_len: int = 2048, seed: int = 0) -> dict:
    """A ShareGPT-like trace on the engine (paged + recompute) with a KV pool of ``pool_bytes`` holding K/V in
    ``kv_format`` ("fp16" or "int8") for the recorded GPU cost model's shape (Llama-3-8B layers, H200). The
    cost model's step times are fp16 ones; notebook 09's recorded kernel timings show int8 decode attention
    about as fast per step, so they stand for both. Returns the blocks, the requests running after each step,
    the steps and the simulated seconds the trace took."""
    from labkit.engine import EngineConfig, LLMEngine, SamplingParams
    from labkit.engine.simulated_runner import recorded_gpu_runner
    from labkit.traces import make_trace

    runner, config = recorded_gpu_runner(16)
    num_blocks = pool_bytes // (kv_bytes_per_token(config, kv_format) * 16)
    engine = LLMEngine(runner=runner, model_config=config, eos_token_ids=(),
                       config=EngineConfig.preset("paged", num_blocks=num_blocks, block_size=16, max_num_seqs=512))
    trace = make_trace("sharegpt", num_requests=num_requests, rate=rate, seed=seed, max_len=max_len)
    for r in trace:
        engine.add_request([1] * r.prompt_len, SamplingParams(max_tokens=r.output_len, ignore_eos=True),
                           arrival_s=r.arrival_s)
    engine.run(max_steps=500_000)
    return {"num_blocks": num_blocks, "running": [h.num_running for h in engine.history],
            "num_steps": len(engine.history), "seconds": engine.now,
            "preemptions": engine.stats()["num_preemptions"]}


def running_figure(runs: dict, pool_bytes: int):
    import plotly.graph_objects as go

    fig = go.Figure()
    for fmt, r in runs.items():
        fig.add_scatter(x=list(range(r["num_steps"])), y=r["running"], mode="lines",
                        name=f"{fmt}: {r['num_blocks']} blocks, done after {r['seconds']:.1f} s ({r['num_steps']} steps)")
    fig.update_layout(title=f"Requests running at once, one {pool_bytes / 2**30:g} GiB KV pool (engine on the "
                            "recorded H200 cost model, Llama-3-8B shape)",
                      xaxis_title="engine step", yaxis_title="running requests", height=360)
    return fig


def bench_figure(bench: dict, source: str, impls=("fp16_v2", "fp16_auto", "int8_v2", "fp8_v2")):
    """data/bench/kv_quant.json: one decode step of paged attention per kernel and shape."""
    import plotly.graph_objects as go

    rows = [r for r in bench["rows"] if r["impl"] in impls and "median_ms" in r]
    shapes = sorted({(r["batch"], r["context"]) for r in rows})
    fig = go.Figure()
    for impl in impls:
        by = {(r["batch"], r["context"]): r for r in rows if r["impl"] == impl}
        fig.add_bar(x=[f"{b} x {c}" for b, c in shapes], y=[1e3 * by[s]["median_ms"] if s in by else None for s in shapes],
                    name=impl, text=[f"{by[s]['speedup_vs_fp16_v2']:.2f}x" if s in by else "" for s in shapes])
    fig.update_layout(title=f"Paged decode attention, one step · {source}", xaxis_title="batch x context",
                      yaxis_title="time (µs)", barmode="group", height=380)
    return fig, rows
