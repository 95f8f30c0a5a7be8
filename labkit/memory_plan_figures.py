"""Pictures of a memory plan (labkit.memory_plan) and the controls to explore it.

    memory_split_figure(plan)          per model: weights / activations / KV pool / free, and the device's total
    pool_as_others_grow_figure(...)    the LLM's KV pool and concurrent sequences as the other models' budgets grow
    PlanExplorer                       a budget slider per model -> KV blocks and concurrent users per model, against
                                       the device: the recorded H200 (data/bench/shared_gpu.json) or this machine's RAM
"""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.memory_plan import MiB, GiB, MemoryProfile, PlanError, plan_memory, pool_as_others_grow  # noqa: F401

PART_COLORS = {"weights": "#264653", "activations": "#e9c46a", "KV pool": "#2a9d8f", "free": "#dddddd"}
MODEL_COLORS = ["#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]


def _unit(nbytes: float) -> tuple[float, str]:
    return (GiB, "GiB") if nbytes >= 4 * GiB else (MiB, "MiB")


def memory_split_figure(plan, tokens_per_seq: int | None = None, title: str | None = None) -> go.Figure:
    """Left: the device, split into each model's budget and what no one was given. Right: inside each budget,
    weights / activations / KV pool / free, with the pool's blocks and the sequences it holds."""
    scale, unit = _unit(plan.device_bytes)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.35, 0.65], horizontal_spacing=0.12,
                        subplot_titles=(f"the device ({plan.device_bytes / scale:.1f} {unit})", "inside each budget"))
    for i, m in enumerate(plan.models):
        fig.add_trace(go.Bar(y=["device"], x=[m.budget_bytes / scale], orientation="h", name=m.name,
                             marker_color=MODEL_COLORS[i % len(MODEL_COLORS)], legendgroup="budgets",
                             hovertemplate=f"{m.name}: %{{x:.2f}} {unit}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(y=["device"], x=[plan.unassigned_bytes / scale], orientation="h", name="unassigned",
                         marker_color=PART_COLORS["free"], legendgroup="budgets"), row=1, col=1)
    names = [m.name for m in plan.models]
    parts = {"weights": [m.profile.weight_bytes for m in plan.models],
             "activations": [m.profile.activation_bytes for m in plan.models],
             "KV pool": [m.kv_bytes for m in plan.models], "free": [m.free_bytes for m in plan.models]}
    for part, values in parts.items():
        fig.add_trace(go.Bar(y=names, x=[v / scale for v in values], orientation="h", name=part,
                             marker_color=PART_COLORS[part], legendgroup="parts",
                             hovertemplate=f"%{{y}} {part}: %{{x:.3f}} {unit}<extra></extra>"), row=1, col=2)
    for m in plan.models:
        tokens = m.profile.max_model_len if tokens_per_seq is None else min(tokens_per_seq, m.profile.max_model_len)
        label = (f"{m.num_blocks:,} blocks: K/V of {m.pool_seqs(tokens_per_seq):,} seqs of {tokens} tokens; "
                 f"serves {m.max_concurrent_seqs(tokens_per_seq)} (max_num_seqs {m.profile.max_num_seqs})"
                 if m.profile.has_kv_cache else f"no KV cache; serves a batch of {m.profile.max_num_seqs}")
        fig.add_annotation(x=m.budget_bytes / scale, y=m.name, text=label, showarrow=False, xanchor="left",
                           xshift=4, row=1, col=2)
    fig.update_layout(barmode="stack", height=120 + 70 * len(plan.models),
                      title=title or f"memory plan on {plan.device_name}", legend_traceorder="grouped")
    fig.update_xaxes(title_text=unit)
    return fig


def pool_as_others_grow_figure(rows: list[dict], llm: str, title: str = "") -> go.Figure:
    scale, unit = _unit(max(r["others_bytes"] + r["llm_budget"] for r in rows))
    x = [r["others_bytes"] / scale for r in rows]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=x, y=[r["num_blocks"] for r in rows], name=f"{llm}: KV blocks", line_color="#2a9d8f"))
    fig.add_trace(go.Scatter(x=x, y=[r["pool_seqs"] for r in rows], name=f"{llm}: sequences the pool holds",
                             line=dict(color="#e76f51", dash="dot")), secondary_y=True)
    fig.update_xaxes(title_text=f"memory given to the other models ({unit})")
    fig.update_yaxes(title_text="KV blocks", secondary_y=False)
    fig.update_yaxes(title_text="full-length sequences", secondary_y=True)
    fig.update_layout(height=380, title=title or f"the pool {llm} gets as the other models grow")
    return fig


def recorded_plan_inputs() -> tuple[str, int, list[MemoryProfile]]:
    """(device name, device bytes, measured profiles) from data/bench/shared_gpu.json."""
    from labkit.bench import record

    data = record.load("shared_gpu")
    return (data["device_memory"]["name"], int(data["device_memory"]["bytes"]),
            [MemoryProfile(**p) for p in data["profiles"]])


class PlanExplorer:
    """Budget sliders (one per model, in MiB, log scale), a device switch and a tokens-per-sequence slider;
    ``update()`` redraws (the notebook's controls call it, tests call it directly).

    ``devices``: {label: (device name, device bytes, [MemoryProfile, ...])}."""

    def __init__(self, devices: dict, default_budgets: dict[str, dict[str, int]] | None = None):
        import ipywidgets as widgets

        if not devices:
            raise ValueError("PlanExplorer needs at least one device")
        self.devices = devices
        self.default_budgets = default_budgets or {}
        self.device = widgets.Dropdown(options=list(devices), description="device")
        self.tokens = widgets.IntSlider(value=256, min=16, max=8192, step=16, description="tokens/seq")
        self.sliders: dict = {}
        self.box = widgets.VBox()
        self.message = widgets.HTML()
        self.out = widgets.Output()
        self.last_figure: go.Figure | None = None
        self._busy = False
        self.device.observe(lambda _: self._rebuild(), names="value")
        self.tokens.observe(lambda _: self.update(), names="value")
        self.widget = widgets.VBox([self.device, self.box, self.tokens, self.message, self.out])
        self._rebuild()

    def _rebuild(self) -> None:
        import ipywidgets as widgets

        name, total, profiles = self.devices[self.device.value]
        defaults = self.default_budgets.get(self.device.value, {})
        self.sliders = {}
        for p in profiles:
            value = defaults.get(p.name, max(p.min_budget_bytes * 2, int(total * 0.1)))
            s = widgets.FloatLogSlider(value=value / MiB, base=10, min=0, max=len(str(int(total / MiB))),
                                       step=0.02, description=p.name, readout_format=".0f")
            s.observe(lambda _: self.update(), names="value")
            self.sliders[p.name] = s
        self._busy = True  # changing the tokens slider's range fires its observer: draw once, below
        self.tokens.max = max(16, max(p.max_model_len for p in profiles))
        self.tokens.value = min(self.tokens.value, self.tokens.max)
        self._busy = False
        self.box.children = list(self.sliders.values())
        self.update()

    def budgets(self) -> dict[str, int]:
        return {n: int(s.value * MiB) for n, s in self.sliders.items()}

    def update(self):
        """Redraw for the current controls; returns the plan, or the PlanError that refused it."""
        if self._busy:
            return None
        name, total, profiles = self.devices[self.device.value]
        self.out.clear_output(wait=True)
        try:
            plan = plan_memory(total, self.budgets(), profiles, device_name=name)
        except PlanError as exc:
            self.message.value = f"<b style='color:#b00'>refused:</b> {exc}"
            self.last_figure = None
            return exc
        users = ", ".join(f"{m.name}: {m.max_concurrent_seqs(self.tokens.value)}" for m in plan.models)  # noqa: E501
        self.message.value = f"concurrent sequences of {self.tokens.value} tokens: {users}"
        self.last_figure = memory_split_figure(plan, self.tokens.value, title=f"{self.device.value}: {name}")
        with self.out:
            self.last_figure.show()
        return plan
