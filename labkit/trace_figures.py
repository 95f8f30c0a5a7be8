"""Figures of a workload (``labkit.traces``): what the requests of a trace look like."""
from __future__ import annotations

import plotly.graph_objects as go


def request_lengths_figure(trace, title: str = "Request lengths of the synthetic ShareGPT trace (generated)"):
    """Overlaid histograms of the prompt and output lengths of every request of ``trace``."""
    fig = go.Figure()
    fig.add_histogram(x=[r.prompt_len for r in trace], name="prompt", opacity=0.7, nbinsx=60)
    fig.add_histogram(x=[r.output_len for r in trace], name="output", opacity=0.7, nbinsx=60)
    fig.update_layout(barmode="overlay", title=title, xaxis_title="tokens", yaxis_title="requests", height=320)
    return fig
