"""Figures of load-test runs (``labkit.loadtest``) and of the recorded serving benchmark (data/bench/serve.json):
output tokens/s, p99 TTFT and median TPOT against concurrent users, one line per server."""
from __future__ import annotations


def sweep_rows(name: str, runs: list[dict]) -> list[dict]:
    """Closed-loop runs as flat rows (server, users, output_tok_s, ttft_p99_s, tpot_p50_s, errors), the
    schema of data/bench/serve.json."""
    return [{"server": name, "users": r["users"], "output_tok_s": r["summary"]["output_tok_s"],
             "ttft_p99_s": r["summary"]["ttft_s"]["p99"], "tpot_p50_s": r["summary"]["tpot_s"]["p50"],
             "errors": r["summary"]["errors"]} for r in runs]


def rows_figure(rows: list[dict], title: str = "Load test: closed loop"):
    """Output tokens/s, p99 TTFT and median TPOT against users, one line per ``server`` of the rows."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=("output tokens/s", "TTFT p99 (s, log)", "TPOT p50 (s)"))
    names = list(dict.fromkeys(r["server"] for r in rows))
    for k, name in enumerate(names):
        color = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a"][k % 5]
        mine = sorted((r for r in rows if r["server"] == name), key=lambda r: r["users"])
        x = [r["users"] for r in mine]
        for col, key in enumerate(("output_tok_s", "ttft_p99_s", "tpot_p50_s"), start=1):
            fig.add_trace(go.Scatter(x=x, y=[r[key] for r in mine], name=name, mode="lines+markers",
                                     line=dict(color=color), legendgroup=name, showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(type="log", title_text="concurrent users")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title=title, height=380)
    return fig


def sweep_figure(sweeps: dict[str, list[dict]], title: str = "Load test: closed loop"):
    """:func:`rows_figure` of several sweeps (server name -> its closed-loop runs)."""
    return rows_figure([row for name, runs in sweeps.items() for row in sweep_rows(name, runs)], title)
