"""Pictures of the KV pool: where every slot was, at every step, and the controls to explore them.

    memory_map_figure(sim, step)     address x time heatmap (coloured by state or by request), with a
                                     snapshot of the whole pool at ``step`` beside it
    where_memory_went_figure(sims)   stacked bars: share of the pool used / reserved / internal / external / free
    useful_over_time_figure(sims)    share of the pool holding tokens, step by step
    block_map_figure(sim, step)      paged: physical blocks coloured by owner, and each request's block table
    block_size_sweep_figure(rows)    paged: waste against block size (+ kernel timings if recorded:
                                     recorded_kernel_times() reads data/bench/paged_attention.json)
    MemoryMapExplorer, BlockMapExplorer   ipywidgets controls; ``update()`` redraws and can be called directly

Every map is rebuilt from a :class:`labkit.pool_history.PoolHistory`, the engine's own per-step accounting
(its residencies say which request held which blocks when, and how many slots it filled), so a figure
never disagrees with the numbers the run printed. Block ids are addresses: block b holds slots
``b * block_size ... (b + 1) * block_size - 1``.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from labkit.pool_history import CATEGORIES, PoolHistory

STATE_COLORS = {  # one colour per labkit.pool_history.CATEGORIES entry, in that order
    "used": "#1f77b4",
    "reserved": "#9ecae1",
    "internal": "#ff7f0e",
    "external": "#d62728",
    "free": "#eeeeee",
}
REQUEST_COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
                  "#ff7f0e", "#d62728"]
FREE_CODE = CATEGORIES.index("free")
EXTERNAL_CODE = CATEGORIES.index("external")


# ---------------------------------------------------------------------------------------------
# Rebuilding the pool's contents from the engine's accounting
# ---------------------------------------------------------------------------------------------
def pool_contents(sim: PoolHistory, steps) -> tuple[np.ndarray, np.ndarray]:
    """(state, owner), each (len(steps), capacity): the category code (index into CATEGORIES) and the
    owning request id (-1 for none) of every slot after each of ``steps``."""
    steps = np.asarray(steps, dtype=np.int64)
    if np.any(np.diff(steps) <= 0):
        raise ValueError("pool_contents needs steps in increasing order")
    state = np.full((len(steps), sim.capacity), FREE_CODE, dtype=np.int8)
    owner = np.full((len(steps), sim.capacity), -1, dtype=np.int32)
    bs = sim.block_size
    for res in sim.residencies:
        lo, hi = np.searchsorted(steps, [res.admit_step, res.end_step + 1])
        for i in range(lo, hi):
            t = int(steps[i])
            n = res.tokens_at(t)
            blocks = np.asarray(res.blocks_at(t), dtype=np.int64)  # logical block j at physical block blocks[j]
            pos = (np.arange(len(blocks))[:, None] * bs + np.arange(bs)[None, :]).ravel()
            addr = (blocks[:, None] * bs + np.arange(bs)[None, :]).ravel()
            state[i, addr] = np.where(pos < n, 0, np.where(pos < res.final_len, 1, 2))  # used/reserved/internal
            owner[i, addr] = res.req_id
    # contiguous: free gaps too small for the first waiting request are external fragmentation
    for i, t in enumerate(steps):
        need = sim.head_need[t]
        if need:
            free = np.concatenate([[False], state[i] == FREE_CODE, [False]])
            edges = np.flatnonzero(np.diff(free.astype(np.int8)))
            for a, b in zip(edges[::2], edges[1::2]):
                if b - a < need:
                    state[i, a:b] = EXTERNAL_CODE
    return state, owner


def _bin_majority(codes: np.ndarray, bin_size: int, num_codes: int) -> np.ndarray:
    """(T, capacity) codes -> (T, capacity // bin_size): the most common code in each bin."""
    T, cap = codes.shape
    nb = cap // bin_size
    c = codes[:, : nb * bin_size].reshape(T, nb, bin_size)
    counts = np.stack([(c == k).sum(-1) for k in range(num_codes)], axis=-1)
    return counts.argmax(-1)


def _discrete_scale(colors: list[str]) -> list:
    k = len(colors)
    return [s for i, c in enumerate(colors) for s in ((i / k, c), ((i + 1) / k, c))]


def _colour_codes(state, owner, color_by):
    """Codes and colours for a heatmap: by state, or by owning request (light shade = held but empty)."""
    if color_by == "state":
        return state, [STATE_COLORS[c] for c in CATEGORIES]
    if color_by != "request":
        raise ValueError(f"color_by must be 'state' or 'request', got {color_by!r}")
    n = len(REQUEST_COLORS)
    codes = np.where(owner >= 0, 2 + 2 * (owner % n) + (state != 0), np.where(state == EXTERNAL_CODE, 1, 0))
    colors = [STATE_COLORS["free"], STATE_COLORS["external"]]
    for c in REQUEST_COLORS:
        colors += [c, _lighten(c)]
    return codes, colors


def _lighten(hex_color: str, amount: float = 0.65) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{int(v + (255 - v) * amount):02x}" for v in (r, g, b))


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------
def memory_map_figure(sim: PoolHistory, step: int | None = None, color_by: str = "state", time_bins: int = 200,
                      addr_bins: int = 128, snapshot_cols: int = 64, title: str | None = None) -> go.Figure:
    """Left: the pool over time (y = slot address, x = step), each cell the majority of its slots.
    Right: the whole pool after ``step``, wrapped into rows of ``snapshot_cols`` cells (read it like text).
    Both sides come from :func:`pool_contents`, so they agree with ``sim.counts``."""
    step = sim.num_steps // 2 if step is None else int(np.clip(step, 0, sim.num_steps - 1))
    steps = np.unique(np.linspace(0, sim.num_steps - 1, min(time_bins, sim.num_steps)).astype(np.int64))
    all_steps = np.union1d(steps, [step])  # sorted, as pool_contents needs
    state, owner = pool_contents(sim, all_steps)
    codes, colors = _colour_codes(state, owner, color_by)
    k = len(colors)
    at = np.searchsorted(all_steps, steps)
    bin_size = max(1, sim.capacity // addr_bins)
    over_time = _bin_majority(codes[at], bin_size, k)  # (T, bins)
    owners_t = owner[at][:, ::bin_size][:, : over_time.shape[1]]
    i = int(np.searchsorted(all_steps, step))
    cell = max(1, sim.capacity // (snapshot_cols * 32))  # snapshot: ~32 rows of snapshot_cols cells
    snap = _bin_majority(codes[i:i + 1], cell, k)[0]
    rows = len(snap) // snapshot_cols
    snap_grid = snap[: rows * snapshot_cols].reshape(rows, snapshot_cols)
    snap_owner = owner[i, ::cell][: rows * snapshot_cols].reshape(rows, snapshot_cols)

    scale = dict(colorscale=_discrete_scale(colors), zmin=-0.5, zmax=k - 0.5, showscale=False)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.7, 0.3], horizontal_spacing=0.08, subplot_titles=(
        "pool over time (address x step)", f"pool after step {step} ({cell} slots per cell)"))
    fig.add_trace(go.Heatmap(z=over_time.T, x=steps, y=np.arange(over_time.shape[1]) * bin_size,
                             customdata=owners_t.T, hovertemplate="step %{x}<br>slot %{y}<br>request %{customdata}"
                             "<extra></extra>", **scale), 1, 1)
    fig.add_trace(go.Heatmap(z=snap_grid, x=np.arange(snapshot_cols) * cell,
                             y=np.arange(rows) * cell * snapshot_cols, customdata=snap_owner,
                             hovertemplate="slot %{y} + %{x}<br>request %{customdata}<extra></extra>", **scale), 1, 2)
    fig.add_vline(x=step, line_color="black", line_width=2, row=1, col=1)
    if color_by == "state":  # legend entries for the categories (heatmaps have no legend of their own)
        for c in CATEGORIES:
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=c,
                                     marker=dict(size=12, symbol="square", color=STATE_COLORS[c])), 1, 1)
    counts = {c: int(sim.counts[c][step]) for c in CATEGORIES}
    line = ", ".join(f"{c} {100 * v / sim.capacity:.0f}%" for c, v in counts.items())
    fig.update_yaxes(title_text="slot address", autorange="reversed", row=1, col=1)
    fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=2)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_layout(height=480, margin=dict(t=90), legend=dict(orientation="h", y=-0.15),
                      title=dict(text=(title or f"{sim.pool_name}: {sim.capacity} token slots (engine, simulated "
                                                "GPU time)") + f"<br><sup>step {step}: {line}</sup>"))
    return fig


def where_memory_went_figure(sims: dict[str, PoolHistory], window: str = "saturated") -> go.Figure:
    """One stacked bar per pool: mean share of slots in each category over the ``window`` steps."""
    labels = list(sims)
    fig = go.Figure()
    for c in CATEGORIES:
        vals = [100 * sims[lab].shares(window)[c] for lab in labels]
        fig.add_trace(go.Bar(y=labels, x=vals, name=c, orientation="h", marker_color=STATE_COLORS[c],
                             text=[f"{v:.0f}%" if v >= 4 else "" for v in vals], textposition="inside"))
    fig.update_layout(barmode="stack", height=140 + 45 * len(labels), xaxis_title="% of the KV pool",
                      yaxis=dict(autorange="reversed"), legend=dict(orientation="h", y=-0.35),
                      title=f"Where the KV memory went (simulated; mean over {window} steps)")
    return fig


def useful_over_time_figure(sims: dict[str, PoolHistory], max_points: int = 800) -> go.Figure:
    """Share of the pool that holds a token, per step, for each pool, against the engine's clock."""
    fig = go.Figure()
    for label, sim in sims.items():
        every = -(-sim.num_steps // max_points)  # keep the figure light: at most max_points per line
        steps = np.arange(0, sim.num_steps, every)
        fig.add_trace(go.Scatter(x=np.round(sim.step_end_s[steps], 3), y=np.round(
            100 * sim.counts["used"][steps] / sim.capacity, 2), name=label, mode="lines"))
    fig.update_layout(height=340, xaxis_title="time (s of simulated GPU serving)",
                      yaxis_title="% of pool holding tokens",
                      yaxis_range=[0, 100], title="Useful share of the KV pool over time (simulated)")
    return fig


def block_map_figure(sim: PoolHistory, step: int, cols: int = 8, title: str | None = None) -> go.Figure:
    """Paged: physical blocks (left, ``cols`` per row) coloured by owning request, each labelled with its
    block id and fill; right, the block table of every request in the pool at ``step``."""
    if sim.allocation != "paged":
        raise ValueError(f"block_map_figure needs a paged pool; this one is {sim.pool_name}")
    bs, num_blocks = sim.block_size, sim.num_blocks
    owner = np.full(num_blocks, -1)
    fill = np.zeros(num_blocks, dtype=np.int64)
    tables = []
    for res in sim.residencies:
        if not res.admit_step <= step <= res.end_step:
            continue
        n = res.tokens_at(step)
        table = res.blocks_at(step)
        for j, b in enumerate(table):
            owner[b], fill[b] = res.req_id, min(bs, n - j * bs)
        tables.append((res.req_id, n, table))
    rows = -(-num_blocks // cols)
    n_col = len(REQUEST_COLORS)
    z = np.full(rows * cols, np.nan)
    z[:num_blocks] = np.where(owner >= 0, owner % n_col + 1, 0)
    text = [f"b{b}<br>r{owner[b]} {fill[b]}/{bs}" if owner[b] >= 0 else f"b{b}<br>free" for b in range(num_blocks)]
    text += [""] * (rows * cols - num_blocks)
    colors = [STATE_COLORS["free"], *REQUEST_COLORS]
    scale = dict(colorscale=_discrete_scale(colors), zmin=-0.5, zmax=len(colors) - 0.5, showscale=False)
    width = max([len(t) for _, _, t in tables] + [1])
    tz = np.full((max(len(tables), 1), width), np.nan)
    ttext = np.full(tz.shape, "", dtype=object)
    for i, (rid, n, table) in enumerate(tables):
        tz[i, : len(table)] = rid % n_col + 1
        ttext[i, : len(table)] = [str(b) for b in table]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.1, subplot_titles=(
        f"physical blocks ({num_blocks} x {bs} slots)", "block tables: logical block -> physical block id"))
    fig.add_trace(go.Heatmap(z=z.reshape(rows, cols), text=np.asarray(text, dtype=object).reshape(rows, cols),
                             texttemplate="%{text}", hoverinfo="text", xgap=2, ygap=2, **scale), 1, 1)
    fig.add_trace(go.Heatmap(z=tz, text=ttext, texttemplate="%{text}", hoverinfo="skip", xgap=2, ygap=2,
                             y=[f"r{rid} ({n} tok)" for rid, n, _ in tables] or ["(none)"], **scale), 1, 2)
    fig.update_yaxes(autorange="reversed", showticklabels=False, row=1, col=1)
    fig.update_yaxes(autorange="reversed", type="category", row=1, col=2)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_xaxes(title_text="logical block", dtick=1, row=1, col=2)
    used, cap = int(sim.counts["used"][step]), sim.capacity
    fig.update_layout(height=120 + 42 * max(rows, len(tables)), title=(
        f"{title or 'Paged pool'} at step {step}: {used}/{cap} slots hold tokens, "
        f"{int(np.count_nonzero(owner >= 0))}/{num_blocks} blocks in use"))
    return fig


def recorded_kernel_times(name: str = "paged_attention") -> tuple[dict | None, str]:
    """Paged-attention kernel times per block size from ``data/bench/NAME.json``, if it recorded any:
    ``({impl: {block_size: median_ms}, "_source": ...}, note)`` or ``(None, why not)``."""
    from labkit.bench import record

    try:
        data = record.load(name)
    except FileNotFoundError:
        return None, f"data/bench/{name}.json is not recorded yet"
    rows = [r for r in data.get("rows", []) if "block_size" in r and "median_ms" in r and "error" not in r]
    sizes = {r["block_size"] for r in rows}
    if len(sizes) < 2:
        fixed = data.get("shapes", {}).get("block_size", sorted(sizes))
        return None, f"data/bench/{name}.json times one block size only ({fixed})"
    # one shape and dtype: the one measured at the most block sizes
    shape = lambda r: (r.get("dtype"), r.get("batch"), r.get("context"))  # noqa: E731
    best = max({shape(r) for r in rows}, key=lambda k: len({r["block_size"] for r in rows if shape(r) == k}))
    kernel: dict = {}
    for r in rows:
        if shape(r) == best:
            kernel.setdefault(r["impl"], {})[int(r["block_size"])] = float(r["median_ms"])
    device = data.get("provenance", {}).get("device", "?")
    kernel["_source"] = f"recorded on GPU ({device}; {best[0]}, batch {best[1]} x context {best[2]})"
    return kernel, kernel["_source"]


def kernel_time_spread(kernel: dict) -> float:
    """Largest relative spread of one kernel's time across block sizes: (slowest - fastest) / fastest."""
    spreads = [max(t.values()) / min(t.values()) - 1 for impl, t in kernel.items() if not impl.startswith("_") and t]
    return max(spreads, default=0.0)


def block_size_sweep_figure(rows: list[dict], kernel: dict | None = None, missing: str | None = None) -> go.Figure:
    """Waste against block size (from ``fragmentation.block_size_sweep``); kernel timings on a second
    axis when ``kernel`` (``{impl: {block_size: ms}, "_source": ...}``) is given, else ``missing`` says why not.
    The kernel axis starts at zero, so a change of a few percent looks like one (not like a cliff)."""
    bs = [str(r["block_size"]) for r in rows]
    fig = make_subplots(specs=[[{"secondary_y": kernel is not None}]])
    fig.add_trace(go.Bar(x=bs, y=[100 * (r["reserved"] + r["internal"]) for r in rows], name="held but empty",
                         marker_color=STATE_COLORS["reserved"]))
    fig.add_trace(go.Bar(x=bs, y=[100 * r["free"] for r in rows], name="free", marker_color="#bbbbbb"))
    if kernel is not None:
        for impl, times in kernel.items():
            if impl.startswith("_"):
                continue
            xs = [b for b in bs if int(b) in times]
            fig.add_trace(go.Scatter(x=xs, y=[times[int(b)] for b in xs], name=f"{impl} (ms)", mode="lines+markers"),
                          secondary_y=True)
        top = max(v for impl, t in kernel.items() if not impl.startswith("_") for v in t.values())
        fig.update_yaxes(title_text="kernel time (ms, from zero)", range=[0, 1.15 * top], secondary_y=True)
        note = (f"waste: engine, simulated GPU time; kernel times {kernel.get('_source', 'recorded')}, "
                f"{100 * kernel_time_spread(kernel):.0f}% apart across block sizes")
    else:
        note = (f"waste: engine, simulated GPU time; no kernel timings per block size ({missing or 'none given'}): "
                "waste side only")
    fig.update_layout(barmode="stack", height=400, xaxis_title="block size (token slots)",
                      title=f"Paged pool: waste vs block size<br><sup>{note}</sup>")
    fig.update_yaxes(title_text="% of pool not holding tokens (saturated steps)", secondary_y=False)
    return fig


# ---------------------------------------------------------------------------------------------
# Widgets
# ---------------------------------------------------------------------------------------------
class MemoryMapExplorer:
    """Time scrubber, reservation policy, max length and the clients' max_new_tokens cap over the memory map.

    ``explorer.update()`` redraws into ``explorer.out``; the controls call it on every change. Show the
    controls with ``display(explorer.widget)``. Simulations are cached per setting.
    """

    POLICIES = {
        "contiguous: reserve max_len": ("contiguous", "max_len"),
        "contiguous: reserve prompt + max_new_tokens": ("contiguous", "max_new_tokens"),
        "contiguous: reserve prompt + true output (oracle)": ("contiguous", "oracle"),
        "paged: block 16": ("paged", "max_len"),
    }
    CAPS = {"none (whatever the context leaves)": None, "1024": 1024, "512": 512, "256": 256}

    def __init__(self, trace: str = "sharegpt", max_lens=(1024, 2048, 4096), **run_kw):
        import ipywidgets as W

        self.trace, self.run_kw = trace, run_kw
        self._cache: dict = {}
        self._busy = False
        self._shown: PoolHistory | None = None
        self.figure: go.Figure | None = None  # the figure drawn last
        wide = W.Layout(width="440px")
        self.policy = W.Dropdown(options=list(self.POLICIES), description="policy", layout=wide)
        self.max_len = W.Dropdown(options=list(max_lens), value=2048 if 2048 in max_lens else max_lens[0],
                                  description="max_len")
        self.cap = W.Dropdown(options=list(self.CAPS), description="client cap", layout=wide,
                              tooltip="max_new_tokens each client sends with its request")
        self.color_by = W.ToggleButtons(options=["state", "request"], description="colour by")
        self.step = W.IntSlider(value=0, min=0, max=1, description="step", continuous_update=False,
                                layout=W.Layout(width="640px"))
        self.out = W.Output()
        for w in (self.policy, self.max_len, self.cap, self.color_by, self.step):
            w.observe(lambda _change: self.update(), names="value")
        self.widget = W.VBox([W.HBox([self.policy, self.max_len]), W.HBox([self.cap, self.color_by]), self.step,
                              self.out])

    def simulation(self) -> PoolHistory:
        from labkit.fragmentation import run

        key = (self.policy.value, self.max_len.value, self.cap.value)
        if key not in self._cache:
            cache, reserve = self.POLICIES[key[0]]
            self._cache[key] = run(cache, self.trace, reserve, 16, self.CAPS[key[2]], max_len=key[1],
                                   **self.run_kw)[1]
        return self._cache[key]

    def update(self) -> None:
        if self._busy:  # moving the slider below from here fires observers; draw once
            return
        self._busy = True
        try:
            sim = self.simulation()
            if sim is not self._shown:  # a new simulation: start a quarter of the way into it
                self.step.max = sim.num_steps - 1
                self.step.value = min(sim.num_steps - 1, int(np.argmax(sim.saturated)) + sim.num_steps // 4)
                self._shown = sim
            self.figure = memory_map_figure(sim, self.step.value, self.color_by.value,
                                            title=f"{self.policy.value}, max_len {self.max_len.value}, "
                                                  f"client cap {self.cap.value.split(' ')[0]} (simulated)")
            self.out.clear_output(wait=True)
            with self.out:
                self.figure.show()
        finally:
            self._busy = False


class BlockMapExplorer:
    """Step through a paged run (a PoolHistory) and watch blocks being handed out and returned."""

    def __init__(self, sim: PoolHistory, cols: int = 8, title: str | None = None):
        import ipywidgets as W

        self.sim, self.cols, self.title = sim, cols, title
        self.step = W.IntSlider(value=0, min=0, max=sim.num_steps - 1, description="step", continuous_update=False)
        self.play = W.Play(value=0, min=0, max=sim.num_steps - 1, interval=700, description="play")
        W.jslink((self.play, "value"), (self.step, "value"))
        self.out = W.Output()
        self.step.observe(lambda _change: self.update(), names="value")
        self.widget = W.VBox([W.HBox([self.play, self.step]), self.out])
        self.figure: go.Figure | None = None  # the figure drawn last

    def update(self) -> None:
        self.figure = block_map_figure(self.sim, self.step.value, self.cols, self.title)
        self.out.clear_output(wait=True)
        with self.out:
            self.figure.show()
