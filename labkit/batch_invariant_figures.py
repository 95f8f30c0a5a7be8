"""Notebook 14's batch-invariance figure: the same request alone vs batched, in the default and invariant modes.

Reads what ``python -m labkit.bench batch_invariance`` records (or its CPU ``--quick`` rows): per mode, the
distinct completions and the largest |logit difference| vs the alone run, and the decode tokens/s (the cost).
"""
from __future__ import annotations

MODES = ("default", "batch_invariant")


def invariance_figure(result: dict, dtype: str | None = None):
    """Three panels: distinct completions, max |logit diff| (log scale) and decode tokens/s, per mode."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = [r for r in result["rows"] if dtype is None or r["dtype"] == dtype]
    fig = make_subplots(rows=1, cols=3, subplot_titles=("distinct completions", "max |logit - alone|",
                                                        "decode tokens/s"))
    for mode, colour in zip(MODES, ("#d62728", "#2ca02c")):
        runs = [r for r in rows if r["mode"] == mode and r["experiment"] in ("co-batched", "chunked")]
        names = [r["experiment"] for r in runs]
        fig.add_bar(x=names, y=[r["distinct_completions"] for r in runs], name=mode, marker_color=colour,
                    legendgroup=mode, row=1, col=1)
        # an exact 0 has no place on a log axis: drawn at 1e-12 and said so in the hover text
        fig.add_bar(x=names, y=[max(r["max_abs_logit_diff"], 1e-12) for r in runs], name=mode, marker_color=colour,
                    legendgroup=mode, showlegend=False, row=1, col=2,
                    hovertext=[f"{r['max_abs_logit_diff']:.3g} ({r['bitwise_identical_runs']}/{r['runs']} "
                               "bitwise identical)" for r in runs])
        speed = [r for r in rows if r["mode"] == mode and r["experiment"] == "decode"]
        fig.add_trace(go.Scatter(x=[r["batch"] for r in speed], y=[r["decode_tok_s"] for r in speed], name=mode,
                                 mode="lines+markers", line_color=colour, legendgroup=mode, showlegend=False),
                      row=1, col=3)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="batch", type="log", row=1, col=3)
    device = result.get("provenance", {}).get("device", "")
    fig.update_layout(barmode="group", height=360, title=f"{result['shapes']['model']}, {dtype or ''} {device}")
    return fig
