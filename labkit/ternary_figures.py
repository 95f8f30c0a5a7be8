"""Notebook 10's figures and its weight-histogram widget (the lesson's code is in ``labkit.ternary``)."""
from __future__ import annotations

import math

import plotly.graph_objects as go

from labkit.ternary import LINEAR_NAMES, absmean_ternarise

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


def weight_bytes_figure(sizes: dict[str, int], title: str) -> go.Figure:
    """Bars of bytes per format, e.g. ``{"fp16": ..., "ternary": ...}``, in GiB."""
    gib = {f: b / 2**30 for f, b in sizes.items()}
    fig = go.Figure(go.Bar(x=list(gib), y=list(gib.values()), text=[f"{v:.1f} GiB" for v in gib.values()],
                           textposition="outside"))
    fig.update_layout(title=title, yaxis_title="GiB", height=330)
    return fig


def linear_weight(model, layer: int, proj: str):
    """The weight (out, in) of linear ``proj`` (one of LINEAR_NAMES) in decoder layer ``layer``."""
    if proj not in LINEAR_NAMES:
        raise ValueError(f"proj must be one of {LINEAR_NAMES}, got {proj!r}")
    block = model.model.layers[layer]
    return getattr(block.self_attn if proj in ATTENTION_LINEARS else block.mlp, proj).weight.detach()


def weight_histogram(w, title: str, max_points: int = 20000) -> tuple[go.Figure, float, float]:
    """(histogram of W / mean|W| with the +-0.5 rounding thresholds, share of zeros, relative error)."""
    t, s = absmean_ternarise(w)
    zeros = (t == 0).float().mean().item()
    err = ((t.float() * s - w).norm() / w.norm()).item()
    fig = go.Figure(go.Histogram(x=(w / s).flatten()[:max_points].numpy(), nbinsx=120))
    for x in (-0.5, 0.5):
        fig.add_vline(x=x, line_dash="dash", line_color="red")
    fig.update_layout(title=f"{title}: W / mean|W| ({zeros:.0%} become 0, error {err:.0%})",
                      xaxis_title="W / scale (red: the ±0.5 rounding thresholds)", yaxis_title="weights", height=320)
    return fig, zeros, err


class WeightHistogramExplorer:
    """Pick a layer and a linear; see its weights against the ternary thresholds. ``figure``, ``zeros`` and
    ``error`` are those of the choice last drawn."""

    def __init__(self, model, note: str = ""):
        import ipywidgets as W

        self.model, self.note = model, note
        self.layer = W.IntSlider(value=0, min=0, max=model.config.num_hidden_layers - 1, description="layer",
                                 continuous_update=False)
        self.proj = W.Dropdown(options=list(LINEAR_NAMES), value="up_proj", description="linear")
        self.out = W.Output()
        self.figure, self.zeros, self.error = None, float("nan"), float("nan")
        for w in self.controls:
            w.observe(lambda _change: self.update(), names="value")
        self.widget = W.VBox([W.HBox([self.layer, self.proj]), self.out])

    @property
    def controls(self):
        return (self.layer, self.proj)

    def update(self) -> None:
        w = linear_weight(self.model, self.layer.value, self.proj.value)
        title = f"layer {self.layer.value} {self.proj.value}" + (f" ({self.note})" if self.note else "")
        self.figure, self.zeros, self.error = weight_histogram(w, title)
        self.out.clear_output(wait=True)
        with self.out:
            self.figure.show()


def perplexity_figure(qat: dict) -> go.Figure:
    """Recorded held-out perplexity: fp32, post-hoc ternary, QAT ternary (``data/model_ternary/qat.json``)."""
    keys = {"fp32 weights": "perplexity_fp32", "post-hoc ternary": "perplexity_posthoc_ternary",
            "QAT ternary": "perplexity_qat_ternary"}
    fig = go.Figure(go.Bar(x=list(keys), y=[qat[k] for k in keys.values()],
                           text=[f"{qat[k]:.1f}" for k in keys.values()], textposition="outside"))
    fig.update_layout(title=f"Held-out perplexity, {qat['eval_tokens']:,} tokens (recorded by labkit.qat on "
                            f"{qat['device']})", yaxis_type="log", yaxis_title="perplexity (log scale)", height=340)
    return fig


def qat_loss_figure(qat: dict) -> go.Figure:
    """The QAT run's training loss, with the held-out losses drawn as what they are: points after training.

    The training loss is measured on training batches with dropout on (the run's ``dropout``), so it is not
    comparable to a held-out loss level; the two held-out points (fp32 model, QAT ternary model) are compared
    with each other, at the end of the run.
    """
    log = qat["loss_log"]
    last = log[-1]["step"]
    fig = go.Figure()
    fig.add_scatter(x=[r["step"] for r in log], y=[r["loss"] for r in log], mode="lines",
                    name=f"training loss, ternary forward (training batches, dropout {qat.get('dropout', 0)})")
    for label, key, symbol in (("held-out loss, fp32 model", "perplexity_fp32", "circle"),
                               ("held-out loss, QAT ternary model", "perplexity_qat_ternary", "diamond")):
        fig.add_scatter(x=[last], y=[math.log(qat[key])], mode="markers+text", marker=dict(size=11, symbol=symbol),
                        name=label, text=[f"{math.log(qat[key]):.3f}"], textposition="middle left")
    fig.update_layout(title=f"QAT on {qat['device']} (recorded): training loss during the run; held-out losses "
                            f"({qat['eval_tokens']:,} tokens) after it",
                      xaxis_title="step", yaxis_title="loss (nats/token)", height=360,
                      legend=dict(orientation="h", y=-0.3))
    return fig


def quant_speed_figure(rows: list[dict], impls: list[str], source: str) -> go.Figure:
    """Recorded GEMV/GEMM time against batch m, one line per implementation, on the first weight shape."""
    shapes = sorted({(r["n"], r["k"]) for r in rows})
    n, k = shapes[0]
    fig = go.Figure()
    for impl in impls:
        pts = sorted((r["m"], r["median_ms"]) for r in rows if r["impl"] == impl and (r["n"], r["k"]) == (n, k))
        if pts:
            fig.add_scatter(x=[p[0] for p in pts], y=[1e3 * p[1] for p in pts], mode="lines+markers", name=impl)
    fig.update_layout(title=f"x (m, {k}) @ W ({n}, {k})ᵀ · {source}", xaxis_title="batch m", xaxis_type="log",
                      yaxis_title="time (µs)", height=360)
    return fig
