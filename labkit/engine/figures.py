"""Figures of the recorded engine benchmark (``data/bench/engine.json``, ``python -m labkit.bench engine``)."""
from __future__ import annotations

import plotly.graph_objects as go

from labkit.bench import load

IMPL_NAMES = {"labkit_engine": "labkit engine (CUDA graphs)", "labkit_engine_eager": "labkit engine (eager)",
              "hf_generate_sequential": "transformers generate, one at a time",
              "hf_generate_batched": "transformers generate, padded batches"}


def _recorded(name: str) -> tuple[dict | None, str]:
    """data/bench/NAME.json and a line saying where it came from (or that it is not recorded yet)."""
    try:
        data = load(name)
    except FileNotFoundError as e:
        return None, f"not recorded yet: {e}"
    p = data["provenance"]
    return data, f"recorded on {p['device']} ({p['date'][:10]}, torch {p['torch']}, triton {p['triton']}): {p['command']}"


def recorded_engine() -> tuple[dict | None, str]:
    """The recorded benchmark and a line saying where it came from (or how to record it)."""
    return _recorded("engine")


def decode_step_figure(data: dict) -> go.Figure:
    """Decode step time against batch size, with and without CUDA graphs, against the memory floor."""
    steps = data["decode_steps"]
    fig = go.Figure()
    for graphs, fused, name, color in ((False, False, "eager (Python launches every kernel)", "#d62728"),
                                       (True, False, "CUDA graph replay", "#2ca02c"),
                                       (False, True, "eager, fused ops", "#ff9896"),
                                       (True, True, "CUDA graph replay, fused ops", "#1f77b4")):
        rows = sorted((r for r in steps if r["cuda_graphs"] == graphs and bool(r.get("fused")) == fused),
                      key=lambda r: r["batch"])
        if not rows:
            continue
        fig.add_scatter(x=[r["batch"] for r in rows], y=[r["step_ms"] for r in rows], name=name, mode="lines+markers",
                        line=dict(color=color),
                        error_y=dict(type="data", symmetric=False, array=[r["step_ms_p90"] - r["step_ms"] for r in rows],
                                     arrayminus=[r["step_ms"] - r["step_ms_p10"] for r in rows]),
                        text=[f"{r['kernels_per_step']} kernels, {r['launches_per_step']} launches per step"
                              for r in rows], hovertemplate="batch %{x}: %{y:.2f} ms<br>%{text}")
    floor = sorted((r for r in steps if r["floor_ms"]), key=lambda r: r["batch"])
    seen = {}
    for r in floor:
        seen.setdefault(r["batch"], r["floor_ms"])
    fig.add_scatter(x=list(seen), y=list(seen.values()), name="floor: (weights + K/V read) / copy bandwidth",
                    mode="lines", line=dict(color="black", dash="dot"))
    ctx = data["shapes"]["decode_context"]
    fig.update_layout(title=f"One decode step of the engine ({ctx} cached tokens per sequence), median with p10-p90",
                      xaxis=dict(title="sequences in the step", type="log"),
                      yaxis=dict(title="ms per step", rangemode="tozero"), height=430)
    return fig


def recorded_fused() -> tuple[dict | None, str]:
    """The decode steps with and without fused ops (``python -m labkit.bench engine --decode-only --fused``)."""
    return _recorded("engine_fused")


def fused_sentences(data: dict) -> list[str]:
    """Per batch, CUDA-graph step time and kernels a step without and with fused ops, read from the recording."""
    steps = [r for r in data["decode_steps"] if r["cuda_graphs"]]
    out = []
    for batch in sorted({r["batch"] for r in steps}):
        plain = next((r for r in steps if r["batch"] == batch and not r.get("fused")), None)
        fused = next((r for r in steps if r["batch"] == batch and r.get("fused")), None)
        if plain and fused:
            out.append(f"batch {batch}: {plain['kernels_per_step']} -> {fused['kernels_per_step']} kernels a step, "
                       f"{plain['step_ms']:.2f} -> {fused['step_ms']:.2f} ms ({plain['step_ms'] / fused['step_ms']:.2f}x), "
                       f"{plain['ratio_to_floor']:.1f}x -> {fused['ratio_to_floor']:.1f}x the floor")
    return out


def engine_throughput_figure(data: dict) -> go.Figure:
    """Output tokens per second of each implementation on the recorded trace, with TTFT / TPOT in the hover."""
    rows = data["rows"]
    names = [IMPL_NAMES.get(r["impl"], r["impl"]) for r in rows]
    hover = [f"{r['requests']} requests, {r['output_tokens']} tokens in {r['wall_s']:.1f} s<br>"
             f"TTFT p50 {r['ttft_p50_s']:.2f} s, p99 {r['ttft_p99_s']:.2f} s<br>"
             f"TPOT p50 {r['tpot_p50_s'] * 1e3:.1f} ms, p99 {r['tpot_p99_s'] * 1e3:.1f} ms" for r in rows]
    fig = go.Figure(go.Bar(x=[r["output_tok_s"] for r in rows], y=names, orientation="h", hovertext=hover,
                           hoverinfo="text+x", marker_color=["#2ca02c", "#98df8a", "#7f7f7f", "#c7c7c7"][:len(rows)],
                           text=[f"{r['output_tok_s']:,.0f} tok/s" for r in rows], textposition="auto"))
    fig.update_layout(title="Output throughput on the recorded trace (all requests at t = 0)",
                      xaxis=dict(title="output tokens / s", type="log"), height=330, margin=dict(l=260))
    return fig
