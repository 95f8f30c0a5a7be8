"""Notebooks 08 and 10: where a batch-1 GEMV's time goes, replotted from the recordings of
``python -m labkit.bench quant_profile`` (``data/bench/quant_profile*.json``: Nsight Compute counters, a lone
CUDA-graph replay and a call inside a stream of calls, see :mod:`labkit.bench.quant_profile`) and
``python -m labkit.bench quant_sass`` (``data/bench/quant_sass.json``: the SASS of each GEMV's hottest loop).

The budget behind the figures. At the copy bandwidth each SM receives ``copy_gbps / (SMs x clock)`` bytes a clock,
i.e. that many bytes times the weights a byte holds; its four schedulers issue at most four warp instructions a
clock, 128 thread instructions. A GEMV that spends more than

    affordable = 128 / (weights reaching one SM a clock)

thread instructions a weight runs out of issue slots before memory runs out of bytes. The figure draws that limit
when the recording has the SM clock ncu read (``ncu.sm_clock_hz``), and leaves it out when it does not.
"""
from __future__ import annotations

from collections import Counter

from labkit.engine_quant_figures import COLOURS, recordings as _recordings
from labkit.quant_figures import span

__all__ = ["BASELINE", "affordable_instructions", "profile_figure", "profile_sentences", "recordings",
           "sass_figure", "sass_sentences", "timing_figure", "timing_sentences"]

BASELINE = "fp16 cuBLAS"
ISSUE_PER_SM_CLOCK = 128  # 4 schedulers x 1 warp instruction x 32 threads: the most one SM can issue a clock
# SASS opcodes by what they do in these loops; hover text names the opcodes of each family.
FAMILIES = (
    ("fp16 pairs (HFMA2, HADD2, HMUL2)", ("HFMA2", "HADD2", "HMUL2")),
    ("fp32 maths (FFMA, FADD, FMUL, I2F)", ("FFMA", "FADD", "FMUL", "I2F")),
    ("bit unpacking (LOP3, PRMT, SHF, SGXT)", ("LOP3", "PRMT", "SHF", "SGXT")),
    ("integer and address", ("IMAD", "IADD3", "VIADD", "LEA", "ISETP", "SEL", "MOV", "CS2R", "UIADD3", "UISETP",
                             "USHF", "USEL", "UMOV")),
    ("memory (LDG, LDS, STS)", ("LDG", "LDS", "STS")),
    ("control (BRA, BAR, PLOP3, SHFL)", ("BRA", "BAR", "PLOP3", "SHFL")),
)
FAMILY_COLOURS = ("#00cc96", "#636efa", "#ef553b", "#ffa15a", "#ab63fa", "#b6b6b6", "#222222")


def recordings(directory=None) -> list[tuple[str, dict]]:
    """(file name, recording) for every ``quant_profile*.json`` in ``directory`` (default data/bench/)."""
    return _recordings(directory, "quant_profile*.json")


def _format(kernel: str) -> str:
    """The weight format a kernel reads, as :data:`labkit.engine_quant_figures.COLOURS` names it."""
    head = kernel.split()[0]
    return "int4_g128" if head == "int4" else head


def _label(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _shapes(recording: dict) -> list[tuple[int, int]]:
    return list(dict.fromkeys((r["n"], r["k"]) for r in recording["rows"]))


def _kernels(rows: list[dict], kernels=None) -> list[str]:
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    return names if kernels is None else [k for k in names if k in kernels]


def _profiled(recording: dict, shape=None, kernels=None) -> list[dict]:
    """The rows with ncu counters (a row whose profile failed has none), at ``shape`` if given."""
    rows = [r for r in recording["rows"] if r.get("ncu") and r["ncu"].get("thread_instr_per_weight") is not None
            and r["ncu"].get("pct_of_copy") is not None]
    if shape is not None:
        rows = [r for r in rows if (r["n"], r["k"]) == tuple(shape)]
    return [r for r in rows if r["kernel"] in _kernels(rows, kernels)]


def _clock_hz(rows: list[dict]) -> float | None:
    """The median SM clock ncu read over ``rows``; None when the recording predates that counter."""
    clocks = sorted(r["ncu"]["sm_clock_hz"] for r in rows if r["ncu"].get("sm_clock_hz"))
    return clocks[len(clocks) // 2] if clocks else None


def affordable_instructions(recording: dict, row: dict, clock_hz: float) -> float:
    """Thread instructions a weight ``row``'s kernel can spend before its SMs run out of issue slots, if its stored
    bytes came at the recording's copy bandwidth: 128 / (weights reaching one SM a clock)."""
    bytes_per_sm_clock = recording["copy_gbps"] * 1e9 / (recording["provenance"]["sm_count"] * clock_hz)
    weights_per_clock = bytes_per_sm_clock * row["n"] * row["k"] / row["stored_bytes"]
    return ISSUE_PER_SM_CLOCK / weights_per_clock


NOT_WAITING = ("selected",)  # ncu's "selected": the cycle a warp issues (1 an instruction), not a wait


def _top_stall(ncu: dict) -> tuple[str, float] | None:
    stalls = {k: v for k, v in (ncu.get("stalls") or {}).items() if k not in NOT_WAITING}
    return max(stalls.items(), key=lambda kv: kv[1]) if stalls else None


def _hover(r: dict) -> str:
    c = r["ncu"]
    text = (f"{r['kernel']} ({_label((r['n'], r['k']))})<br>{c['thread_instr_per_weight']:.2f} thread instructions "
            f"a weight<br>DRAM {c['dram_gbps']:.0f} GB/s, {c['pct_of_copy']:.0f}% of the copy<br>occupancy "
            f"{c['occupancy_achieved_pct']:.0f}% achieved of {c['occupancy_theoretical_pct']:.0f}% theoretical"
            f"<br>schedulers issuing {c['issue_active_pct']:.0f}% of cycles")
    top = _top_stall(c)
    if top:
        text += f"<br>top stall: {top[0]}, {top[1]:.1f} cycles an instruction"
    return text + f"<br>{c['registers_per_thread']:.0f} registers a thread, {c['waves_per_sm']:.2f} waves"


def _stall_reasons(rows: list[dict], keep: int = 4) -> list[str]:
    """The ``keep`` reasons with the most stall cycles over ``rows``; the rest are drawn as "other"."""
    total = Counter()
    for r in rows:
        total.update(r["ncu"].get("stalls") or {})
    return [name for name, _ in total.most_common(keep)]


def profile_figure(recording: dict, shape=(4096, 14336), kernels=None):
    """Top: thread instructions a weight (ncu, whole kernel) against achieved DRAM bandwidth as a share of the copy
    bandwidth, one marker a kernel (hover: occupancy, issue, top stall); with the SM clock recorded, each format's
    issue limit as a dotted curve (100% of the copy up to its affordable instructions a weight, falling as 1/x
    after). Bottom left: schedulers' issue-active % and achieved occupancy. Bottom right: cycles a warp waited per
    issued instruction, by reason."""
    from plotly.subplots import make_subplots

    from labkit.engine_quant_figures import recorded_source

    rows = _profiled(recording, shape, kernels)
    if not rows:
        raise ValueError(f"no kernel with ncu counters at {_label(shape)} in this recording (shapes: "
                         f"{[_label(s) for s in _shapes(recording)]}); record one with python -m labkit.bench "
                         "quant_profile")
    names = [r["kernel"] for r in rows]
    fig = make_subplots(rows=2, cols=2, specs=[[{"colspan": 2}, None], [{}, {}]], vertical_spacing=0.2,
                        subplot_titles=("instructions a weight against DRAM bandwidth",
                                        "schedulers issuing, warps resident (% of peak)",
                                        "cycles waited per issued instruction"))
    for r in rows:
        words = "words" in r["kernel"].lower()
        fig.add_scatter(x=[r["ncu"]["thread_instr_per_weight"]], y=[r["ncu"]["pct_of_copy"]], mode="markers+text",
                        text=[r["kernel"]], textposition="top center", name=r["kernel"], hovertext=[_hover(r)],
                        hoverinfo="text", showlegend=False,
                        marker=dict(size=13, color=COLOURS.get(_format(r["kernel"])),
                                    symbol="diamond" if words else "circle"), row=1, col=1)
    clock = _clock_hz(rows)
    top = max(r["ncu"]["thread_instr_per_weight"] for r in rows) * 1.15
    if clock:
        for fmt in dict.fromkeys(_format(n) for n in names):
            first = next(r for r in rows if _format(r["kernel"]) == fmt)
            budget = affordable_instructions(recording, first, clock)
            xs = [budget * i / 20 for i in range(1, 21)] + [budget + (top - budget) * i / 40 for i in range(1, 41)]
            fig.add_scatter(x=xs, y=[100 * min(1.0, budget / x) for x in xs], mode="lines", name=f"{fmt} issue limit",
                            line=dict(color=COLOURS.get(fmt), dash="dot"), row=1, col=1)
    fig.add_hline(y=100, line_dash="dash", line_color="grey", row=1, col=1)
    for name, key, colour in (("issue active", "issue_active_pct", "#636efa"),
                              ("occupancy achieved", "occupancy_achieved_pct", "#ef553b")):
        fig.add_bar(x=names, y=[r["ncu"][key] for r in rows], name=name, marker_color=colour, row=2, col=1)
    reasons = _stall_reasons(rows)
    base = [0.0] * len(rows)  # stacked by hand: the issue panel's bars are grouped, and barmode is the figure's
    for i, reason in enumerate(reasons + ["other"]):
        ys = [sum(v for k, v in (r["ncu"].get("stalls") or {}).items() if k not in reasons) if reason == "other"
              else (r["ncu"].get("stalls") or {}).get(reason, 0.0) for r in rows]
        fig.add_bar(x=names, y=ys, base=list(base), offsetgroup="stall", name=f"stall: {reason}",
                    marker_color=FAMILY_COLOURS[i % len(FAMILY_COLOURS)], row=2, col=2)
        base = [b + y for b, y in zip(base, ys)]
    fig.update_xaxes(title_text="thread instructions a weight (ncu, whole kernel)", row=1, col=1)
    fig.update_yaxes(title_text="DRAM GB/s, % of the copy", row=1, col=1)
    fig.update_yaxes(title_text="%", row=2, col=1)
    fig.update_yaxes(title_text="cycles / instruction", row=2, col=2)
    fig.update_xaxes(tickangle=-35, row=2)
    fig.update_layout(barmode="group", height=820)
    note = "dotted: each format's issue limit at the SM clock ncu read" if clock else \
        "no SM clock in this recording: the issue limits are not drawn"
    fig.update_layout(title=f"Where a batch-1 GEMV's time goes, {_label(shape)} ({note})<br><sub>"
                            f"{recorded_source(recording)}</sub>")
    return fig


def profile_sentences(recording: dict, kernels=None) -> list[str]:
    """Per kernel, over the recorded shapes: instructions a weight, DRAM share of the copy, issue-active %,
    occupancy and the stall reason with the most cycles; first, when the SM clock was recorded, what each format can
    afford. Every number read from ``recording``."""
    rows = _profiled(recording, kernels=kernels)
    out = []
    clock = _clock_hz(rows)
    if clock:
        prov = recording["provenance"]
        per_sm = recording["copy_gbps"] * 1e9 / (prov["sm_count"] * clock)
        budgets = []
        for name in _kernels(rows):
            mine = [affordable_instructions(recording, r, clock) for r in rows if r["kernel"] == name]
            budgets.append(f"{name} {span(mine, '.1f')}")
        out.append(f"At the SM clock ncu read ({clock / 1e9:.2f} GHz) the copy bandwidth "
                   f"({recording['copy_gbps']:.0f} GB/s over {prov['sm_count']} SMs) brings each SM {per_sm:.1f} "
                   f"bytes a clock; at {ISSUE_PER_SM_CLOCK} thread instructions a clock, a kernel can afford at most "
                   "this many instructions a weight: " + ", ".join(budgets) + ".")
    for name in _kernels(rows):
        mine = [r["ncu"] for r in rows if r["kernel"] == name]
        text = (f"{name}, over {len(mine)} shapes: {span([c['thread_instr_per_weight'] for c in mine], '.1f')} thread "
                "instructions a weight, "
                f"DRAM at {span([c['pct_of_copy'] for c in mine], '.0f')}% of the copy bandwidth, schedulers issuing "
                f"{span([c['issue_active_pct'] for c in mine], '.0f')}% of cycles, occupancy "
                f"{span([c['occupancy_achieved_pct'] for c in mine], '.0f')}%")
        waves = [c["waves_per_sm"] for c in mine if c.get("waves_per_sm") is not None]
        if waves:  # the grid over what the GPU holds at once: under 1, part of the GPU has no program at all
            text += f" in {span(waves, '.2f')} waves"
        tops = Counter(_top_stall(c)[0] for c in mine if _top_stall(c))
        if tops:
            reason, count = tops.most_common(1)[0]
            cycles = [c["stalls"][reason] for c in mine if reason in (c.get("stalls") or {})]
            text += f"; most waiting is {reason} ({span(cycles, '.1f')} cycles an issued instruction"
            text += ")" if count == len(mine) else f", the top reason on {count} of {len(mine)} shapes)"
        out.append(text + ".")
    return out


def _timed(recording: dict) -> dict[tuple, dict]:
    return {(r["kernel"], r["n"], r["k"]): r for r in recording["rows"] if r.get("graph_us")}


def _kernel_us(r: dict) -> float | None:
    return (r.get("ncu") or {}).get("kernel_us")


def timing_figure(recording: dict, kernels=None):
    """One panel per shape: each labkit GEMV's speed-up over fp16 cuBLAS as a lone CUDA-graph replay (graph_us), as
    one call in a stream of back-to-back calls (stream_us) and, where ncu ran, the kernel alone (kernel_us); the black
    dash is the byte ideal (fp16's stored bytes over the kernel's)."""
    from plotly.subplots import make_subplots

    from labkit.engine_quant_figures import recorded_source

    by = _timed(recording)
    shapes = [s for s in _shapes(recording) if (BASELINE, *s) in by]
    if not shapes:
        raise ValueError(f"no {BASELINE} timing in this recording: its speed-ups have nothing to divide")
    cols = min(3, len(shapes))
    grid = -(-len(shapes) // cols)
    fig = make_subplots(rows=grid, cols=cols, subplot_titles=[_label(s) for s in shapes], vertical_spacing=0.28)
    timings = (("lone replay (graph_us)", "graph_us", "#636efa"), ("in a stream (stream_us)", "stream_us", "#00cc96"),
               ("kernel alone (ncu kernel_us)", None, "#b6b6b6"))
    for i, (n, k) in enumerate(shapes):
        row, col = i // cols + 1, i % cols + 1
        base = by[(BASELINE, n, k)]
        names = [name for name in _kernels(list(by.values()), kernels) if name != BASELINE and (name, n, k) in by]
        for label, key, colour in timings:
            ys = []
            for name in names:
                r = by[(name, n, k)]
                mine, theirs = (r.get(key), base.get(key)) if key else (_kernel_us(r), _kernel_us(base))
                ys.append(theirs / mine if mine and theirs else None)
            if any(y is not None for y in ys):
                fig.add_bar(x=names, y=ys, name=label, marker_color=colour, legendgroup=label, showlegend=i == 0,
                            row=row, col=col)
        fig.add_scatter(x=names, y=[base["stored_bytes"] / by[(name, n, k)]["stored_bytes"] for name in names],
                        mode="markers", name="byte ideal (fp16 bytes / stored bytes)", legendgroup="ideal",
                        showlegend=i == 0, marker=dict(symbol="line-ew-open", size=18, color="black",
                                                       line=dict(width=3)), row=row, col=col)
        fig.add_hline(y=1.0, line_dash="dot", line_color="grey", row=row, col=col)
        fig.update_yaxes(title_text="× fp16 cuBLAS", row=row, col=col)
    fig.update_xaxes(tickangle=-35)
    fig.update_layout(barmode="group", height=430 * grid,
                      title=f"Speed-up over fp16 cuBLAS at m = {recording['shapes'].get('m', 1)}: alone, in a stream, "
                            f"kernel only<br><sub>"
                            f"{recorded_source(recording)}</sub>")
    return fig


def timing_sentences(recording: dict, kernels=None) -> list[str]:
    """Per labkit GEMV, over the shapes: its speed-up over fp16 cuBLAS as a lone replay and in a stream, and the byte
    ideal; then how much a lone replay adds to the kernel alone, and what a call in a stream saves."""
    by = _timed(recording)
    out = []
    for name in _kernels(list(by.values()), kernels):
        if name == BASELINE:
            continue
        pairs = [(r, by[(BASELINE, r["n"], r["k"])]) for r in by.values()
                 if r["kernel"] == name and (BASELINE, r["n"], r["k"]) in by]
        if not pairs:
            continue
        lone = span([b["graph_us"] / r["graph_us"] for r, b in pairs], ".2f")
        text = f"{name}, over {len(pairs)} shapes: {lone}x fp16 cuBLAS as a lone replay"
        streamed = [b["stream_us"] / r["stream_us"] for r, b in pairs if r.get("stream_us") and b.get("stream_us")]
        if streamed:
            text += f", {span(streamed, '.2f')}x in a stream"
        ideal = [b["stored_bytes"] / r["stored_bytes"] for r, b in pairs]
        out.append(text + f"; the bytes allow {span(ideal, '.2f')}x.")
    mine = [r for r in by.values() if kernels is None or r["kernel"] in kernels]
    gaps = [r["graph_us"] - _kernel_us(r) for r in mine if _kernel_us(r)]
    saved = [r["graph_us"] - r["stream_us"] for r in mine if r.get("stream_us")]
    if gaps:
        out.append(f"A lone replay takes {span(gaps, '.1f')} µs longer than the kernel alone (ncu), across kernels "
                   "and shapes: launching and timing one replay.")
    if saved:
        out.append(f"A call in a stream of calls takes {span(saved, '.1f')} µs less than a lone replay.")
    return out


def _families(mix: dict) -> dict[str, dict[str, int]]:
    """loop_mix regrouped: family -> {opcode: count}; opcodes outside :data:`FAMILIES` under "other"."""
    out = {name: {} for name, _ in FAMILIES}
    out["other"] = {}
    for opcode, count in mix.items():
        family = next((name for name, ops in FAMILIES if opcode in ops), "other")
        out[family][opcode] = count
    return {name: ops for name, ops in out.items() if ops}


def sass_figure(sass: dict, profile: dict | None = None, kernels=None):
    """Stacked bars: the SASS instructions of each GEMV's hottest loop per weight a thread handles there, by opcode
    family (the bar's height is ``instructions_per_weight``); with a quant_profile recording, ncu's thread
    instructions a weight over the whole kernel at the same shape as a black dash."""
    import plotly.graph_objects as go

    from labkit.engine_quant_figures import recorded_source

    rows = [r for r in sass["rows"] if kernels is None or r["kernel"] in kernels]
    names = [r["kernel"] for r in rows]
    grouped = [_families(r["loop_mix"]) for r in rows]
    fig = go.Figure()
    families = [name for name, _ in FAMILIES] + ["other"]
    for colour, family in zip(FAMILY_COLOURS, families):
        if not any(family in g for g in grouped):
            continue
        ys = [sum(g.get(family, {}).values()) / r["weights_per_thread_iteration"] for g, r in zip(grouped, rows)]
        hover = [f"{family}: " + ", ".join(f"{op} {c}" for op, c in g.get(family, {}).items()) +
                 f" in a loop of {r['loop_instructions']} for {r['weights_per_thread_iteration']:.0f} weights a thread"
                 for g, r in zip(grouped, rows)]
        fig.add_bar(x=names, y=ys, name=family, marker_color=colour, hovertext=hover, hoverinfo="text+y")
    shape = (sass["shapes"]["n"], sass["shapes"]["k"])
    if profile is not None:
        counted = {r["kernel"]: r["ncu"]["thread_instr_per_weight"] for r in _profiled(profile, shape)}
        fig.add_scatter(x=names, y=[counted.get(n) for n in names], mode="markers",
                        name="ncu: thread instructions a weight, whole kernel",
                        marker=dict(symbol="line-ew-open", size=24, color="black", line=dict(width=3)))
    fig.update_layout(barmode="stack", height=440, yaxis_title="instructions a weight (one thread's view)",
                      title=f"SASS of each GEMV's hottest loop, per weight, by opcode family ({_label(shape)})"
                            f"<br><sub>{recorded_source(sass)}</sub>")
    return fig


def sass_sentences(sass: dict, profile: dict | None = None, kernels=None) -> list[str]:
    """Per GEMV: its hottest loop's instructions and weights a thread, the two largest opcode families, and (with a
    quant_profile recording) ncu's count over the whole kernel at the same shape."""
    shape = (sass["shapes"]["n"], sass["shapes"]["k"])
    counted = {r["kernel"]: r["ncu"]["thread_instr_per_weight"] for r in _profiled(profile, shape)} if profile else {}
    out = []
    for r in sass["rows"]:
        if kernels is not None and r["kernel"] not in kernels:
            continue
        per = r["weights_per_thread_iteration"]
        sizes = sorted(((sum(ops.values()) / per, family) for family, ops in _families(r["loop_mix"]).items()),
                       reverse=True)
        biggest = " and ".join(f"{family.split(' (')[0]} {size:.2f}" for size, family in sizes[:2])
        text = (f"{r['kernel']}: {r['loop_instructions']} instructions in its hottest loop for {per:.0f} weights a "
                f"thread, {r['instructions_per_weight']:.2f} a weight (most: {biggest})")
        if r["kernel"] in counted:
            text += f"; ncu counts {counted[r['kernel']]:.2f} a weight over the whole kernel"
        out.append(text + f" ({_label(shape)}).")
    return out
