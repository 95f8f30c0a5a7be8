"""Notebook 03's figures: the batch slot by slot, serving against concurrent users, the decode roofline, and
the batch explorer widget. Each takes results of ``labkit.user_sweep`` / a recorded roofline and returns a
plotly figure (the widget: an ipywidgets box whose every control redraws the figure).
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.user_sweep import SERVERS, LoadTestResult
from labkit.step_cost import matmul_flops_bytes

COLORS = {"one-at-a-time": "#d62728", "static": "#ff7f0e", "continuous": "#1f77b4"}


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def occupancy_figure(results: dict[str, LoadTestResult], title: str) -> go.Figure:
    """One panel per server: a bar per request in its batch slot over the steps it ran; grey where a
    finished request still holds its slot (static batching waits for the whole batch)."""
    fig = make_subplots(rows=len(results), cols=1, shared_xaxes=True, subplot_titles=list(results),
                        vertical_spacing=0.12)
    for row, (name, res) in enumerate(results.items(), start=1):
        grid = res.slots  # (steps, slots): request id, -1 free, -2 held by a finished request
        color = COLORS.get(name, "#1f77b4")
        for slot in range(grid.shape[1]):
            col = grid[:, slot]
            bars = [(start, n, f"#{sid}", color) for sid in sorted(set(col.tolist()) - {-1, -2})
                    for start, n in _runs(col == sid)]
            bars += [(start, n, "", "lightgrey") for start, n in _runs(col == -2)]
            for start, n, label, c in bars:
                fig.add_bar(y=[f"slot {slot}"], x=[n], base=[start], orientation="h", text=label, marker_color=c,
                            marker_line_color="white", showlegend=False, row=row, col=1)
    fig.update_layout(barmode="overlay", title=title, height=170 * len(results) + 80)
    fig.update_xaxes(title_text="step", row=len(results), col=1)
    return fig


def users_figure(rows: list[dict], title: str, log_y: bool = False, reference: list[dict] | None = None,
                 reference_note: str = "recorded") -> go.Figure:
    """Throughput, latency p50/p99 and TTFT p50 against concurrent users, one colour per server.

    Rows with ``repeats > 1`` (``user_sweep.sweep_users``) draw the median with a bar from the smallest to
    the largest repeat; ``reference`` rows (a recorded run of the same test) are drawn as thin dashed lines."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=("throughput (tokens/s)", "latency p50 (solid), p99 (dotted), s",
                                                        "time to first token p50 (s)"))
    for server in SERVERS:
        rs = [r for r in rows if r["server"] == server]
        if not rs:
            continue
        x = [r["users"] for r in rs]
        style = dict(color=COLORS[server])
        error = None
        if any(r.get("repeats", 1) > 1 for r in rs):
            error = dict(type="data", symmetric=False, thickness=1.5, width=4,
                         array=[r["throughput_hi"] - r["throughput_tok_s"] for r in rs],
                         arrayminus=[r["throughput_tok_s"] - r["throughput_lo"] for r in rs])
        fig.add_scatter(x=x, y=[r["throughput_tok_s"] for r in rs], name=server, line=style, error_y=error,
                        row=1, col=1)
        fig.add_scatter(x=x, y=[r["latency_p50_s"] for r in rs], line=style, showlegend=False, row=1, col=2)
        fig.add_scatter(x=x, y=[r["latency_p99_s"] for r in rs], line=dict(dash="dot", **style), showlegend=False,
                        row=1, col=2)
        fig.add_scatter(x=x, y=[r["ttft_p50_s"] for r in rs], line=style, showlegend=False, row=1, col=3)
        ref = [r for r in reference or [] if r["server"] == server]
        if ref:
            rx = [r["users"] for r in ref]
            thin = dict(color=COLORS[server], dash="dash", width=1)
            fig.add_scatter(x=rx, y=[r["throughput_tok_s"] for r in ref], line=thin, mode="lines",
                            name=f"{server} ({reference_note})", row=1, col=1)
            fig.add_scatter(x=rx, y=[r["latency_p50_s"] for r in ref], line=thin, mode="lines", showlegend=False,
                            row=1, col=2)
            fig.add_scatter(x=rx, y=[r["ttft_p50_s"] for r in ref], line=thin, mode="lines", showlegend=False,
                            row=1, col=3)
    fig.update_xaxes(type="log", title_text="concurrent users", dtick=np.log10(2))
    if log_y:
        fig.update_yaxes(type="log")
    fig.update_layout(title=title, height=400)
    return fig


def roofline_figure(roof: dict, note: str) -> go.Figure:
    """Left: time per layer of the matmuls (and decode attention) against tokens in the step, with the memory
    and compute ceilings measured on the same GPU. Right: the same points as achieved TFLOP/s against
    arithmetic intensity, under the roofline ``min(rate, intensity x bandwidth)``."""
    bw, rate = roof["copy_gbps"], roof["matmul_tflops"]
    rows = lambda impl: [r for r in roof["rows"] if r["impl"] == impl]  # noqa: E731
    mm = rows("layer_matmuls")
    M = np.array([r["tokens"] for r in mm])
    fig = make_subplots(rows=1, cols=2, subplot_titles=("time per layer against batch (tokens in the step)",
                                                        "achieved rate against arithmetic intensity"))
    fig.add_scatter(x=M, y=[r["median_ms"] for r in mm], mode="lines+markers", name="layer matmuls (measured)",
                    line_color="black", row=1, col=1)
    fig.add_scatter(x=M, y=np.array([r["bytes"] for r in mm]) / (bw * 1e9) * 1e3,
                    name="memory ceiling: bytes / copy bandwidth", line=dict(dash="dash", color="#2ca02c"),
                    row=1, col=1)
    fig.add_scatter(x=M, y=np.array([r["flops"] for r in mm]) / (rate * 1e12) * 1e3,
                    name="compute ceiling: FLOPs / matmul rate", line=dict(dash="dash", color="#9467bd"), row=1, col=1)
    attn = rows("decode_attention")
    for L, dash in zip(sorted({r["context"] for r in attn}), ("dot", "dashdot", "longdash")):
        fig.add_scatter(x=[r["batch"] for r in attn if r["context"] == L],
                        y=[r["median_ms"] for r in attn if r["context"] == L],
                        name=f"decode attention, context {L}", line=dict(dash=dash, color="#d62728"), row=1, col=1)
    fig.add_scatter(x=[r["flops"] / r["bytes"] for r in mm], y=[r["tflops"] for r in mm], mode="lines+markers",
                    line_color="black", showlegend=False, row=1, col=2)
    grid = np.logspace(0, 4, 50)
    fig.add_scatter(x=grid, y=np.minimum(rate, grid * bw * 1e9 / 1e12), line=dict(dash="dash", color="grey"),
                    name="roofline min(rate, intensity × bandwidth)", row=1, col=2)
    fig.update_xaxes(type="log", title_text="tokens in the step (decode batch)", row=1, col=1)
    fig.update_yaxes(type="log", title_text="ms per layer", row=1, col=1)
    fig.update_xaxes(type="log", title_text="FLOP per byte", row=1, col=2)
    fig.update_yaxes(type="log", title_text="TFLOP/s", row=1, col=2)
    fig.update_layout(title=f"Roofline of one Llama-3-8B layer (bf16) · {note}", height=430)
    return fig


def roofline_summary(roof: dict, linears: list[tuple[int, int]]) -> list[str]:
    """The numbers the roofline figure shows, as sentences: batch-1 bandwidth, batch-64 speed-up, where the
    ceilings cross and where the measured time has doubled."""
    bw, rate = roof["copy_gbps"], roof["matmul_tflops"]
    mm = [r for r in roof["rows"] if r["impl"] == "layer_matmuls"]
    M = np.array([r["tokens"] for r in mm])
    t = np.array([r["median_ms"] for r in mm])
    ridge = next(m for m in range(1, 1 << 16) if (lambda fb: fb[0] / (rate * 1e12) >= fb[1] / (bw * 1e9))(
        matmul_flops_bytes(linears, m)))
    doubled = M[np.argmax(t >= 2 * t[0])]
    lines = [f"batch 1: {t[0]:.3f} ms per layer = {mm[0]['gbps']:.0f} GB/s of weights "
             f"({100 * mm[0]['gbps'] / bw:.0f}% of copy bandwidth)"]
    if 64 in M:
        t64 = t[M == 64][0]
        lines.append(f"batch 64: {t64:.3f} ms: {64 / (t64 / t[0]):.0f}x the tokens per second of batch 1")
    lines.append(f"the two ceilings cross near {ridge} tokens; the measured time has doubled from batch 1 at {doubled} "
                 f"tokens; at {M[-1]} tokens the matmuls run at {mm[-1]['tflops']:.0f} TFLOP/s "
                 f"({100 * mm[-1]['tflops'] / rate:.0f}% of the measured rate)")
    return lines


class BatchExplorer:
    """Pick a server and a number of users: which batch slots hold a running request (blue), are held idle
    by a finished one (grey) or are free (white), at every step of ``run(server, users)`` (a LoadTestResult).
    Both controls redraw; ``update()`` can be called directly."""

    def __init__(self, run, users_options, note: str, server: str = "static", users: int | None = None):
        import ipywidgets as W

        self.run, self.note = run, note
        self.server = W.Dropdown(options=SERVERS, value=server, description="server")
        users = users or users_options[len(users_options) // 2]
        self.users = W.SelectionSlider(options=list(users_options), value=users, description="users")
        self.out = W.Output()
        for w in (self.server, self.users):
            w.observe(lambda _change: self.update(), names="value")
        self.widget = W.VBox([W.HBox([self.server, self.users]), self.out])
        self.figure: go.Figure | None = None

    def build(self) -> go.Figure:
        res = self.run(self.server.value, self.users.value)
        every = max(1, len(res.slots) // 1500)  # thin long runs for the browser
        used = np.flatnonzero((res.slots != -1).any(0))
        slots = res.slots[:, : used[-1] + 1 if len(used) else 1]  # the slots this run ever filled
        z = np.where(slots >= 0, 2, np.where(slots == -2, 1, 0))[::every].T
        s = res.summary()
        fig = go.Figure(go.Heatmap(z=z, x=res.step_end_s[::every], zmin=0, zmax=2, showscale=False,
                                   colorscale=[[0, "white"], [0.5, "lightgrey"], [1, COLORS["continuous"]]]))
        fig.update_layout(title=f"{self.server.value}, {self.users.value} users: {s['throughput_tok_s']:.0f} tok/s, "
                                f"p50 latency {s['latency_p50_s']:.1f} s · {self.note}",
                          xaxis_title="time (s)", yaxis_title="batch slot", height=330)
        return fig

    def update(self) -> None:
        self.figure = self.build()
        with self.out:
            self.out.clear_output(wait=True)
            self.figure.show()
