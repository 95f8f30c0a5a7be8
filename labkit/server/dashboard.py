"""A live view of a server under load, read from its ``/metrics``: KV blocks, running / waiting, tokens/s.

    dash = LiveDashboard(server.url)          # a plotly FigureWidget: display(dash.widget)
    load = start_load(...)                    # a load test running in the background
    dash.follow(load)                         # scrape every interval until the load ends, redraw each time
    dash.figure()                             # the same samples as a static figure (HTML exports show it)

Tokens/s is the rate of ``labkit:generation_tokens_total`` between two scrapes. Any server exporting the
same names works; a vLLM server exports them as ``vllm:...`` (pass ``prefix="vllm:"``).
"""
from __future__ import annotations

import time

PANELS = ("KV-cache blocks", "requests", "output tokens/s")


def scrape(url: str, prefix: str = "labkit:") -> dict[str, float]:
    """Every sample of ``url``/metrics, summed over labels, keyed by name without ``prefix``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url.rstrip("/") + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(prefix):
                name = s.name[len(prefix):]
                out[name] = out.get(name, 0.0) + s.value
    return out


class LiveDashboard:
    def __init__(self, url: str, title: str = "server under load", prefix: str = "labkit:"):
        self.url, self.title, self.prefix = url, title, prefix
        self.samples: list[dict] = []
        self.widget = self._build(widget=True)

    def _build(self, widget: bool):
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=3, subplot_titles=PANELS)
        fig = go.FigureWidget(fig) if widget else fig
        for name, col in (("blocks used", 1), ("blocks total", 1), ("running", 2), ("waiting", 2),
                          ("tokens/s", 3)):
            fig.add_scatter(x=[], y=[], name=name, mode="lines", row=1, col=col)
        fig.update_xaxes(title_text="seconds")
        fig.update_layout(title=self.title, height=320, margin=dict(t=60, b=40))
        return fig

    def sample(self) -> dict:
        """Scrape once and append a point: t, blocks used/total, running, waiting, tokens/s since the last."""
        m = scrape(self.url, self.prefix)
        now = time.perf_counter()
        tokens = m.get("generation_tokens_total", 0.0)
        prev = self.samples[-1] if self.samples else None
        rate = (tokens - prev["tokens"]) / (now - prev["clock"]) if prev else 0.0
        t0 = self.samples[0]["clock"] if self.samples else now
        point = {"clock": now, "t": now - t0, "tokens": tokens, "tok_s": rate,
                 "used": m.get("kv_blocks_used", 0.0), "total": m.get("kv_blocks_total", 0.0),
                 "running": m.get("num_requests_running", 0.0), "waiting": m.get("num_requests_waiting", 0.0)}
        self.samples.append(point)
        return point

    def _series(self):
        s = self.samples
        t = [p["t"] for p in s]
        return t, ([p["used"] for p in s], [p["total"] for p in s], [p["running"] for p in s],
                   [p["waiting"] for p in s], [p["tok_s"] for p in s])

    def redraw(self) -> None:
        t, ys = self._series()
        with self.widget.batch_update():
            for trace, y in zip(self.widget.data, ys):
                trace.x, trace.y = t, y

    def follow(self, future, interval: float = 0.5, max_seconds: float = 600.0) -> None:
        """Sample and redraw until ``future`` (a load test from :func:`labkit.loadtest.start_load`) is done."""
        deadline = time.perf_counter() + max_seconds
        while not future.done() and time.perf_counter() < deadline:
            self.sample()
            self.redraw()
            time.sleep(interval)
        self.sample()
        self.redraw()

    def figure(self):
        """The samples so far as a static plotly Figure (for exported HTML, where widgets do not run)."""
        fig = self._build(widget=False)
        t, ys = self._series()
        for trace, y in zip(fig.data, ys):
            trace.x, trace.y = t, y
        return fig
