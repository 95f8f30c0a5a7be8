"""Notebooks 08 and 10: the engine's decode speed on quantised weights, replotted from every
data/bench/engine_quant*.json (``python -m labkit.bench engine_quant [--activations fp16]``, see
:mod:`labkit.bench.engine_quant`)."""
from __future__ import annotations

import json
import pathlib
import re

__all__ = ["activation_sentences", "breakdown_sentences", "decode_rows", "recorded_source", "recordings",
           "speed_figure", "speed_sentences", "step_breakdown_figure", "step_sentences"]

COLOURS = {"bf16": "#636efa", "fp16": "#636efa", "int8": "#ef553b", "int4_g128": "#00cc96", "ternary": "#ab63fa"}
KINDS = ("linear", "attention", "norm / rope / act", "kv cache write", "other")  # engine_quant's gpu_time.by_kind
IDLE = "GPU idle (host, gaps)"
KIND_COLOURS = {"linear": "#00cc96", "attention": "#636efa", "norm / rope / act": "#ffa15a",
                "kv cache write": "#ab63fa", "other": "#b6b6b6", IDLE: "#eeeeee"}


def decode_rows(bench: dict) -> list[dict]:
    """The CUDA-graph rows (what a server runs); a CPU smoke recording has only eager ones, then those."""
    rows = bench["rows"]
    graphed = [r for r in rows if r["cuda_graphs"]]
    return graphed or rows


def _dense(bench: dict) -> str:
    """The unquantised baseline's scheme name: its dtype (recordings before --activations: bf16)."""
    return bench["shapes"].get("dense") or "bf16"


def _schemes(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["scheme"] for r in rows))


def speed_figure(bench: dict, source: str):
    """Left: decode tokens/s against batch, one line per scheme. Right: each scheme's tokens/s over bf16's at the
    same batch (solid) and the ratio of their floors, the most the bytes allow (dotted)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = decode_rows(bench)
    dense = _dense(bench)
    titles = ("decode tokens/s", f"speed-up over {dense} (dotted: floor ratio)")
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles)
    for scheme in _schemes(rows):
        mine = sorted((r for r in rows if r["scheme"] == scheme), key=lambda r: r["batch"])
        colour = COLOURS.get(scheme)
        batches = [r["batch"] for r in mine]
        fig.add_scatter(x=batches, y=[r["tok_s"] for r in mine], name=scheme, mode="lines+markers",
                        line=dict(color=colour), legendgroup=scheme, row=1, col=1)
        if scheme == dense:
            continue
        fig.add_scatter(x=batches, y=[r["ratio_to_dense"] for r in mine], name=f"{scheme} / {dense}",
                        mode="lines+markers",
                        line=dict(color=colour), legendgroup=scheme, showlegend=False, row=1, col=2)
        if any(r["floor_ratio_to_dense"] for r in mine):
            fig.add_scatter(x=batches, y=[r["floor_ratio_to_dense"] for r in mine], name=f"{scheme} floor ratio",
                            mode="lines", line=dict(color=colour, dash="dot"), legendgroup=scheme, showlegend=False,
                            row=1, col=2)
    fig.add_hline(y=1.0, line_dash="dash", line_color="grey", row=1, col=2)
    fig.update_xaxes(type="log", title_text="batch (sequences decoding)")
    fig.update_yaxes(title_text="tokens/s", row=1, col=1)
    fig.update_yaxes(title_text=f"× {dense}", row=1, col=2)
    shapes = bench["shapes"]
    fused = ", fused ops" if any(r.get("fused") for r in rows) else ""  # engine_quant --fused tags its rows
    fig.update_layout(title=f"The engine on quantised weights{fused}: {shapes['model']}, {dense} activations, "
                            f"{shapes['decode_context']} cached tokens a sequence<br><sub>{source}</sub>", height=440)
    return fig


def speed_sentences(bench: dict) -> list[str]:
    """What the figure shows, in words, every number read from ``bench``."""
    rows = decode_rows(bench)
    batches = sorted({r["batch"] for r in rows})
    lo, hi = batches[0], batches[-1]
    by = {(r["scheme"], r["batch"]): r for r in rows}
    dense = _dense(bench)
    out = []
    for scheme in _schemes(rows):
        if scheme == dense or (scheme, lo) not in by or by[(scheme, lo)]["ratio_to_dense"] is None:
            continue
        first, last = by[(scheme, lo)], by.get((scheme, hi))
        text = f"{scheme}: {first['ratio_to_dense']:.2f}x {dense}'s tokens/s at batch {lo}"
        if first["floor_ratio_to_dense"]:
            text += f" (its bytes allow {first['floor_ratio_to_dense']:.2f}x)"
        if last is not None and hi != lo:
            text += f", {last['ratio_to_dense']:.2f}x at batch {hi}"
        out.append(text + ".")
    return out


def recordings(directory: pathlib.Path | None = None, pattern: str = "engine_quant*.json") -> list[tuple[str, dict]]:
    """(file name, recording) for every file matching ``pattern`` (default ``engine_quant*.json``) in ``directory``
    (default data/bench/), sorted by name; an empty list when none has been recorded."""
    if directory is None:
        from labkit.bench import BENCH_DIR as directory
    return [(p.name, json.loads(p.read_text())) for p in sorted(pathlib.Path(directory).glob(pattern))]


def recorded_source(bench: dict) -> str:
    """Where and how a recording was made: device, date and the command (its ``--out`` path left out)."""
    prov = bench["provenance"]
    command = re.sub(r"\s+--out\s+\S+", "", prov.get("command") or "?")
    return f"recorded on {prov['device']} ({prov['date'][:10]}) by {command}"


def step_sentences(bench: dict) -> list[str]:
    """How far the dense model's decode step is from its memory floor, and how many kernels it launches, at the
    smallest and largest batch: why fewer weight bytes buy little end to end."""
    rows = [r for r in decode_rows(bench) if r["scheme"] == _dense(bench)]
    if not rows:
        return []
    out = []
    for r in sorted(rows, key=lambda r: r["batch"])[:: max(1, len(rows) - 1)]:
        text = f"{_dense(bench)} at batch {r['batch']}: a decode step takes {r['step_ms']:.2f} ms"
        if r.get("floor_ms"):
            text += (f", {r['step_ms'] / r['floor_ms']:.1f}x its memory floor ({r['floor_ms']:.2f} ms: the bytes it "
                     "reads over the copy bandwidth)")
        out.append(text + f", in {r['kernels_per_step']} kernels.")
    return out


def activation_sentences(recorded: list[tuple[str, dict]], scheme: str = "int4_g128") -> list[str]:
    """``scheme``'s batch-1 tokens/s over the dense model's, one clause per recording (their activation dtypes
    differ): where the quantised kernels' fast paths need fp16 x, the bf16 recording shows what falling back costs."""
    parts = []
    for name, bench in recorded:
        first = min((r for r in decode_rows(bench) if r["scheme"] == scheme), key=lambda r: r["batch"], default=None)
        if first is not None and first["ratio_to_dense"] is not None:
            parts.append(f"{first['ratio_to_dense']:.2f}x {_dense(bench)} with {_dense(bench)} activations ({name})")
    return [f"{scheme} at batch 1: " + "; ".join(parts) + "."] if parts else []


def _profiled_rows(bench: dict) -> list[dict]:
    """The decode rows with a step's GPU time by kernel kind (recordings before it have none: skipped)."""
    return [r for r in decode_rows(bench) if r.get("gpu_time") and r["gpu_time"].get("by_kind")]


def _kinds(rows: list[dict]) -> list[str]:
    recorded = {kind for r in rows for kind in r["gpu_time"]["by_kind"]}
    return [k for k in KINDS if k in recorded] + sorted(recorded - set(KINDS))


def step_breakdown_figure(bench: dict, source: str):
    """Stacked bars per (batch, scheme): one decode step's kernel time by kind (summed kernel durations under
    torch.profiler) and the rest of its wall time, when the GPU ran no kernel (host work, launch gaps); each bar's
    height is the step's wall time, step_ms."""
    import plotly.graph_objects as go

    rows = sorted(_profiled_rows(bench), key=lambda r: r["batch"])
    if not rows:
        raise ValueError("no row of this recording has gpu_time: record it again with python -m labkit.bench "
                         "engine_quant (it profiles one step per scheme and batch)")
    x = [[f"batch {r['batch']}" for r in rows], [r["scheme"] for r in rows]]
    fig = go.Figure()
    for kind in _kinds(rows):
        fig.add_bar(x=x, y=[r["gpu_time"]["by_kind"].get(kind, 0.0) for r in rows], name=kind,
                    marker_color=KIND_COLOURS.get(kind))
    fig.add_bar(x=x, y=[r["step_ms"] - r["gpu_time"]["busy_ms"] for r in rows], name=IDLE,
                marker_color=KIND_COLOURS[IDLE], marker_line=dict(color="#999999", width=1))
    fig.update_layout(barmode="stack", height=440, yaxis_title="ms a decode step",
                      title=f"Where a decode step's time goes: {bench['shapes']['model']}, LM head "
                            f"{bench['shapes'].get('lm_head', '?')}<br><sub>{source}</sub>")
    return fig


def breakdown_sentences(bench: dict) -> list[str]:
    """At the smallest batch: the dense step by kernel kind and idle time; then for each quantised scheme how much
    its linear kernels shrank, how much of the step did not, and what the step gained (and, at the largest batch,
    its linears against the dense ones). Every number read from ``bench``."""
    rows = _profiled_rows(bench)
    by = {(r["scheme"], r["batch"]): r for r in rows}
    dense = _dense(bench)
    batches = sorted({r["batch"] for r in rows})
    if not batches or (dense, batches[0]) not in by:
        return []
    lo, hi = batches[0], batches[-1]
    base = by[(dense, lo)]
    step, busy, by_kind = base["step_ms"], base["gpu_time"]["busy_ms"], base["gpu_time"]["by_kind"]
    kinds = ", ".join(f"{kind} {by_kind[kind]:.2f}" for kind in _kinds([base]))
    out = [f"{dense} at batch {lo}: a step of {step:.2f} ms, kernels running {busy:.2f} ms of it ({kinds} ms) and the "
           f"GPU idle {step - busy:.2f} ms; with its linears free the step would be at most "
           f"{step / (step - by_kind['linear']):.2f}x faster."]
    for scheme in _schemes(rows):
        mine = by.get((scheme, lo))
        if scheme == dense or mine is None:
            continue
        linear, dense_linear = mine["gpu_time"]["by_kind"]["linear"], base["gpu_time"]["by_kind"]["linear"]
        text = (f"{scheme} at batch {lo}: linear kernels {linear:.2f} ms ({dense_linear / linear:.2f}x faster than "
                f"{dense}'s {dense_linear:.2f}), the rest of the step {mine['step_ms'] - linear:.2f} ms ({dense}: "
                f"{base['step_ms'] - dense_linear:.2f}); the step {base['step_ms'] / mine['step_ms']:.2f}x faster")
        if mine.get("floor_ratio_to_dense"):
            text += f", where its bytes allow {mine['floor_ratio_to_dense']:.2f}x"
        top, top_dense = by.get((scheme, hi)), by.get((dense, hi))
        if hi != lo and top and top_dense:
            text += (f"; at batch {hi} its linears take {top['gpu_time']['by_kind']['linear']:.2f} ms against "
                     f"{dense}'s {top_dense['gpu_time']['by_kind']['linear']:.2f}")
        out.append(text + ".")
    return out
