"""Notebook 07's experiments on the engine, and their figures: preemption by recompute and by swap.

    serve_with_states   run a real model through a pool too small for its requests, recording every request's
                        state after each step (running / waiting / swapped / finished): the timeline figure
    simulate            a ShareGPT-like trace on LLMEngine with the recorded GPU cost model (SimulatedRunner:
                        Llama-3-8B layers on an H200), swap over a host link of the given bandwidth
    policy_widget       sliders for the pool and the link bandwidth that redraw the policy comparison

The policies themselves are the engine's (``labkit/engine/scheduler.py``, ``labkit/engine/policies.py``).
"""
from __future__ import annotations

import functools

from labkit.engine import EngineConfig, LLMEngine, SamplingParams

__all__ = ["serve_with_states", "timeline_figure", "simulate", "policy_figure", "policy_widget",
           "recorded_swap_bytes_per_s", "POOLS", "BANDWIDTHS_GBPS"]

POOLS = (96, 128, 192, 384, 768)  # blocks of 16 tokens
BANDWIDTHS_GBPS = (0.1, 0.5, 2.0, 8.0, 32.0)
COLOURS = {"recompute": "#264653", "swap": "#e76f51", "running": "#2a9d8f", "waiting": "#e9c46a",
           "swapped": "#e76f51"}


def serve_with_states(model, cfg: EngineConfig, prompts, max_tokens: int):
    """Serve ``prompts`` (greedy, ``max_tokens`` each); returns (engine, sequences, states) where states[t] maps
    each request id to its status after step t."""
    engine = LLMEngine(model, cfg, eos_token_ids=())
    seqs = [engine.add_request(p, SamplingParams(max_tokens=max_tokens)) for p in prompts]
    states = []
    for _ in range(100_000):
        if not engine.has_unfinished():
            break
        engine.step()
        states.append({s.seq_id: s.status.value for s in seqs})
    return engine, seqs, states


def timeline_figure(states, title: str):
    """One row per request, one cell per step, coloured by its state after that step."""
    import plotly.graph_objects as go

    code = {"running": 2, "swapped": 1, "waiting": 0.5, "finished": 0}
    ids = sorted(states[0])
    z = [[code[st[i]] for st in states] for i in ids]
    text = [[st[i] for st in states] for i in ids]
    scale = [[0, "#ffffff"], [0.25, COLOURS["waiting"]], [0.5, COLOURS["swapped"]], [1.0, COLOURS["running"]]]
    fig = go.Figure(go.Heatmap(z=z, text=text, hovertemplate="request %{y}, step %{x}: %{text}<extra></extra>",
                               x=list(range(len(states))), y=[f"request {i}" for i in ids], colorscale=scale,
                               zmin=0, zmax=2, showscale=False, xgap=1, ygap=3))
    fig.update_layout(title=title + " (teal running, amber waiting, red swapped out, white done)",
                      xaxis_title="engine step", height=120 + 40 * len(ids), yaxis_autorange="reversed")
    return fig


def recorded_swap_bytes_per_s() -> tuple[float | None, str]:
    """(bytes/s, where it comes from) of the recorded host link (data/bench/swap.json), or (None, why not)."""
    from labkit.bench import load
    from labkit.bench.swap import swap_bytes_per_s

    try:
        data = load("swap")
    except FileNotFoundError:
        return None, "data/bench/swap.json is not recorded yet (a GPU machine runs `python -m labkit.bench swap`)"
    p = data["provenance"]
    return swap_bytes_per_s(data), f"recorded on {p['device']} ({p['date'][:10]}): pinned host memory, 64 blocks"


@functools.lru_cache(maxsize=256)
def _trace(num_requests: int, rate: float, max_len: int, seed: int):
    from labkit.traces import make_trace

    return make_trace("sharegpt", num_requests=num_requests, rate=rate, seed=seed, max_len=max_len)


@functools.lru_cache(maxsize=512)
def simulate(num_blocks: int, policy: str, swap_gbps: float = 8.0, num_requests: int = 60, rate: float = 20.0,
             max_len: int = 1024, seed: int = 0) -> dict:
    """The trace on the engine (paged, ``policy`` = "recompute" | "swap"), timed by the recorded GPU cost
    model; swap moves each block's bf16 K/V at ``swap_gbps`` GB/s. Output tok/s, mean latency, preemptions."""
    from labkit.engine.simulated_runner import recorded_gpu_runner

    runner, model_config = recorded_gpu_runner(16, swap_bytes_per_s=swap_gbps * 1e9)
    preset = "swap" if policy == "swap" else "paged"
    cfg = EngineConfig.preset(preset, num_blocks=num_blocks, block_size=16, max_num_seqs=32)
    engine = LLMEngine(runner=runner, model_config=model_config, config=cfg, eos_token_ids=())
    trace = _trace(num_requests, rate, max_len, seed)
    seqs = [engine.add_request([1] * r.prompt_len, SamplingParams(max_tokens=r.output_len, ignore_eos=True),
                               arrival_s=r.arrival_s) for r in trace]
    engine.run(max_steps=200_000)
    span = max(s.finished_s for s in seqs) - min(s.arrival_s for s in seqs)
    recomputed = sum(r.num_prefill_tokens for r in engine.history) - sum(s.num_prompt_tokens for s in seqs)
    return {"throughput_tok_s": sum(s.num_output_tokens for s in seqs) / span,
            "mean_latency_s": sum(s.latency for s in seqs) / len(seqs),
            "preemptions": engine.stats()["num_preemptions"], "recomputed_tokens": recomputed,
            "swapped_blocks": sum(r.swapped_out_blocks + r.swapped_in_blocks for r in engine.history)}


def policy_figure(num_blocks: int = 128, swap_gbps: float = 8.0, recorded_gbps: float | None = None):
    """Three panels for one (pool, bandwidth): throughput and latency against the pool (swap at this bandwidth),
    and throughput against the bandwidth at this pool. Markers show the chosen values."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pools, bws = list(POOLS), list(BANDWIDTHS_GBPS)
    fig = make_subplots(rows=1, cols=3, subplot_titles=("throughput (output tok/s)", "mean latency (s)",
                                                        f"throughput at {num_blocks} blocks"))
    for pol in ("recompute", "swap"):
        runs = [simulate(p, pol, swap_gbps if pol == "swap" else 8.0) for p in pools]
        for col, key in ((1, "throughput_tok_s"), (2, "mean_latency_s")):
            fig.add_trace(go.Scatter(x=pools, y=[r[key] for r in runs], name=pol, line_color=COLOURS[pol],
                                     showlegend=col == 1, legendgroup=pol), row=1, col=col)
            here = simulate(num_blocks, pol, swap_gbps if pol == "swap" else 8.0)[key]
            fig.add_trace(go.Scatter(x=[num_blocks], y=[here], mode="markers", marker=dict(size=12, color=COLOURS[pol]),
                                     showlegend=False, legendgroup=pol, hoverinfo="x+y"), row=1, col=col)
    swap_bw = [simulate(num_blocks, "swap", b)["throughput_tok_s"] for b in bws]
    rc = simulate(num_blocks, "recompute")["throughput_tok_s"]
    fig.add_trace(go.Scatter(x=bws, y=swap_bw, name="swap", line_color=COLOURS["swap"], showlegend=False), row=1, col=3)
    fig.add_trace(go.Scatter(x=bws, y=[rc] * len(bws), name="recompute", line_color=COLOURS["recompute"],
                             line_dash="dash", showlegend=False), row=1, col=3)
    fig.add_trace(go.Scatter(x=[swap_gbps], y=[simulate(num_blocks, "swap", swap_gbps)["throughput_tok_s"]],
                             mode="markers", marker=dict(size=12, color=COLOURS["swap"]), showlegend=False), row=1, col=3)
    if recorded_gbps is not None:
        fig.add_vline(x=recorded_gbps, line_dash="dot", row=1, col=3, annotation_text="recorded link")
    for c in (1, 2):
        fig.update_xaxes(title_text="KV pool (blocks of 16)", type="log", row=1, col=c)
    fig.update_xaxes(title_text="swap bandwidth (GB/s)", type="log", row=1, col=3)
    fig.update_layout(height=400, title=f"Preemption policies, pool {num_blocks} blocks, swap at {swap_gbps:g} GB/s "
                                        "(engine on the recorded H200 cost model of a Llama-3-8B shape)")
    return fig


def policy_widget(num_blocks: int = 128, swap_gbps: float = 8.0, recorded_gbps: float | None = None):
    """Sliders (pool, bandwidth) over :func:`policy_figure`; each move re-runs the simulations it needs."""
    import ipywidgets as widgets

    from labkit.live_figure import LiveFigure

    return LiveFigure(functools.partial(policy_figure, recorded_gbps=recorded_gbps),
                      num_blocks=widgets.SelectionSlider(options=list(POOLS), value=num_blocks, description="pool"),
                      swap_gbps=widgets.SelectionSlider(options=list(BANDWIDTHS_GBPS), value=swap_gbps,
                                                        description="GB/s"))
