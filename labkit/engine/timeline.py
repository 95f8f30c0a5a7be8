"""The engine's step timeline: what every step did, drawn from ``LLMEngine.history`` (notebook 11).

    top:    tokens computed per step, split into prefill (prompt chunks, recomputation) and decode
    middle: KV blocks used, out of the pool (the axis starts at 0 and ends at the pool size)
    bottom: running / waiting / swapped sequences; markers where sequences were preempted or hit the cache

``TimelineExplorer`` adds a step slider: a cursor on the figure and that step's record as a table.
"""
from __future__ import annotations

import html

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.engine.llm_engine import StepRecord


def timeline_figure(history: list[StepRecord], num_blocks: int, title: str = "What each engine step did"):
    if not history:
        raise ValueError("the engine has not run a step yet: call engine.step() or engine.run() first")
    steps = [r.step for r in history]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=[0.4, 0.3, 0.3],
                        subplot_titles=("tokens computed", f"KV blocks used (pool: {num_blocks})", "sequences"))
    fig.add_bar(x=steps, y=[r.num_prefill_tokens for r in history], name="prefill tokens", row=1, col=1,
                marker_color="#1f77b4")
    fig.add_bar(x=steps, y=[r.num_decode_tokens for r in history], name="decode tokens", row=1, col=1,
                marker_color="#ff7f0e")
    fig.add_scatter(x=steps, y=[r.num_blocks_used for r in history], name="blocks used", mode="lines",
                    line=dict(color="#17becf", shape="hv"), row=2, col=1)
    for name, key, color in (("running", "num_running", "#2ca02c"), ("waiting", "num_waiting", "#7f7f7f"),
                             ("swapped", "num_swapped", "#9467bd")):
        fig.add_scatter(x=steps, y=[getattr(r, key) for r in history], name=name, mode="lines",
                        line=dict(color=color, shape="hv"), row=3, col=1)
    pre = [r for r in history if r.preempted]
    fig.add_scatter(x=[r.step for r in pre], y=[r.num_running for r in pre], mode="markers", name="preemption",
                    marker=dict(symbol="x", size=10, color="#d62728"),
                    text=[f"preempted {r.preempted}" for r in pre], hoverinfo="text", row=3, col=1)
    hits = [r for r in history if r.cached_tokens]
    fig.add_scatter(x=[r.step for r in hits], y=[r.num_running for r in hits], mode="markers",
                    name="prefix-cache hit", marker=dict(symbol="star", size=10, color="#e377c2"),
                    text=[f"{r.cached_tokens} tokens from the cache" for r in hits], hoverinfo="text", row=3, col=1)
    fig.update_layout(barmode="stack", title=title, height=620, margin=dict(l=60, r=20, t=70, b=40),
                      legend=dict(orientation="h", y=-0.08))
    fig.update_yaxes(range=[0, num_blocks], row=2, col=1)
    fig.update_xaxes(title_text="step", row=3, col=1)
    return fig


def step_table(record: StepRecord) -> str:
    """One step's record as an HTML table."""
    rows = [("step", record.step), ("time (engine clock)", f"{record.start_s:.4f} s (+{record.seconds * 1e3:.2f} ms)"),
            ("sequences in the step", record.num_seqs),
            ("prefill / decode tokens", f"{record.num_prefill_tokens} / {record.num_decode_tokens}"),
            ("blocks used / free", f"{record.num_blocks_used} / {record.num_blocks_free}"),
            ("slots holding a token", record.num_used_slots),
            ("running / waiting / swapped", f"{record.num_running} / {record.num_waiting} / {record.num_swapped}"),
            ("admitted", record.admitted or "-"), ("preempted", record.preempted or "-"),
            ("blocks swapped out / in", f"{record.swapped_out_blocks} / {record.swapped_in_blocks}"),
            ("tokens from the prefix cache", record.cached_tokens), ("finished", record.finished or "-")]
    body = "".join(f"<tr><td style='text-align:left'>{html.escape(str(k))}</td>"
                   f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


class TimelineExplorer:
    """A step slider over the timeline: the cursor moves to that step and the table shows its record.
    Redraws into an ``Output`` widget (plain plotly figures render offline and in exported HTML)."""

    def __init__(self, history: list[StepRecord], num_blocks: int, step: int | None = None):
        import ipywidgets as widgets

        if not history:
            raise ValueError("the engine has not run a step yet: call engine.step() or engine.run() first")
        self.history, self.num_blocks = history, num_blocks
        self.slider = widgets.IntSlider(value=len(history) // 3 if step is None else step, min=0,
                                        max=len(history) - 1, description="step", continuous_update=False,
                                        layout=widgets.Layout(width="600px"))
        self.out = widgets.Output()
        self.table = widgets.HTML()
        self.slider.observe(lambda change: self.show(change["new"]), names="value")
        self.widget = widgets.VBox([self.slider, widgets.HBox([self.out, self.table])])
        self.show(self.slider.value)

    def figure(self, step: int) -> go.Figure:
        fig = timeline_figure(self.history, self.num_blocks)
        fig.add_vline(x=step, line_dash="dot", line_color="black")
        fig.update_layout(width=760)
        return fig

    def show(self, step: int) -> None:
        self.table.value = step_table(self.history[step])
        self.out.clear_output(wait=True)
        with self.out:
            self.figure(step).show()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
