"""Notebooks 08 and 10: the engine's decode speed on quantised weights, replotted from every
data/bench/engine_quant*.json (``python -m labkit.bench engine_quant [--activations fp16]``, see
:mod:`labkit.bench.engine_quant`)."""
from __future__ import annotations

import json
import pathlib
import re

__all__ = ["activation_sentences", "decode_rows", "recorded_source", "recordings", "speed_figure", "speed_sentences",
           "step_sentences"]

COLOURS = {"bf16": "#636efa", "fp16": "#636efa", "int8": "#ef553b", "int4_g128": "#00cc96", "ternary": "#ab63fa"}


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


def recordings(directory: pathlib.Path | None = None) -> list[tuple[str, dict]]:
    """(file name, recording) for every ``engine_quant*.json`` in ``directory`` (default data/bench/), sorted by
    name; an empty list when none has been recorded."""
    if directory is None:
        from labkit.bench import BENCH_DIR as directory
    return [(p.name, json.loads(p.read_text())) for p in sorted(pathlib.Path(directory).glob("engine_quant*.json"))]


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
