"""Notebooks 08 and 10: the next versions of the weight-only kernels, each next to the one it improves on, replotted
from a ``python -m labkit.bench quant_matmul`` recording (``data/bench/quant_matmul_words.json``).

Every number drawn or written comes from the recording: speed-up = fp16 cuBLAS's median time over the kernel's at
the same (m, n, k); byte ideal = fp16 cuBLAS's weight bytes over the kernel's stored bytes (what the speed-up would
be if time were bytes alone); GB/s over the recording's ``copy_gbps`` (a device-to-device copy) says how close to
the memory the kernel runs.
"""
from __future__ import annotations

from labkit.bench.quant_matmul import speedups

__all__ = ["COMPARISONS", "TARGETS", "comparisons_with", "span", "versions_figure", "version_sentences",
           "target_sentences"]

BASELINE = "fp16_cublas"

# (panel title, batch m, the versions side by side: the one improved on first). Versions in one panel store the
# same bytes, so one byte ideal per shape holds for the whole panel.
COMPARISONS = (
    ("int8, m = 1: fp32 GEMV → int32 words", 1, ("labkit_int8", "labkit_int8_words")),
    ("ternary, m = 1: v1 → v2 words", 1, ("labkit_ternary", "labkit_ternary_words")),
    ("int4 g128, m = 1: loads in flight", 1, ("labkit_int4_g128", "labkit_int4_g128_prefetch2",
                                              "labkit_int4_g128_stages")),
    ("int4 g128, m = 16: GEMM → swap-AB", 16, ("labkit_int4_g128_gemm", "labkit_int4_g128_small_m")),
)

# Issue 16's targets (goals, not measurements): (format, m, the versions that compete, speed-up wanted over fp16).
TARGETS = (
    ("int4 g128", 1, ("labkit_int4_g128", "labkit_int4_g128_prefetch2", "labkit_int4_g128_stages"), 3.0),
    ("int8", 1, ("labkit_int8", "labkit_int8_words"), 1.8),
    ("ternary", 1, ("labkit_ternary", "labkit_ternary_words"), 4.0),
    ("int4 g128", 16, ("labkit_int4_g128", "labkit_int4_g128_gemm", "labkit_int4_g128_small_m"), 1.5),
)


def comparisons_with(impl: str) -> tuple:
    """The entries of :data:`COMPARISONS` that show ``impl`` (notebook 10 draws only ternary's)."""
    found = tuple(c for c in COMPARISONS if impl in c[2])
    if not found:
        raise ValueError(f"no comparison shows {impl!r}; the versions compared are "
                         f"{sorted({i for c in COMPARISONS for i in c[2]})}")
    return found


def _rows(result: dict) -> list[dict]:
    return [r for r in result["rows"] if "median_ms" in r]


def _by_key(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["impl"], r["m"], r["n"], r["k"]): r for r in rows}


def _ideal(by: dict, impl: str, m: int, n: int, k: int) -> float | None:
    """fp16 cuBLAS's weight bytes over ``impl``'s: the speed-up if the time were the bytes alone."""
    base, mine = by.get((BASELINE, m, n, k)), by.get((impl, m, n, k))
    if base is None or mine is None:
        return None
    return base["weight_bytes"] / mine["weight_bytes"]


def _present(result: dict, comparisons=COMPARISONS) -> list[tuple[str, int, tuple[str, ...]]]:
    """The comparisons with at least one of their versions (and fp16 cuBLAS) recorded at their m."""
    rows = _rows(result)
    out = []
    for title, m, impls in comparisons:
        recorded = tuple(i for i in impls if any(r["impl"] == i and r["m"] == m for r in rows))
        if recorded and any(r["impl"] == BASELINE and r["m"] == m for r in rows):
            out.append((title, m, recorded))
    return out


def versions_figure(result: dict, source: str, comparisons=COMPARISONS):
    """One panel per comparison: bars of the speed-up over fp16 cuBLAS per weight shape (n x k), one bar per
    version, the byte ideal as a black dash over each shape, 1x dotted. Versions not recorded are left out."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    present = _present(result, comparisons)
    if not present:
        raise ValueError(f"none of the versions {[c[2] for c in comparisons]} (with {BASELINE}) is in this "
                         "recording: record them with python -m labkit.bench quant_matmul --impls ...")
    rows = _rows(result)
    by = _by_key(rows)
    cols = min(2, len(present))  # two panels a row: four side by side leave their titles overlapping
    grid = -(-len(present) // cols)
    fig = make_subplots(rows=grid, cols=cols, subplot_titles=[p[0] for p in present], vertical_spacing=0.18)
    palette = ("#636efa", "#ef553b", "#00cc96")
    for i, (_title, m, impls) in enumerate(present):
        row, col = i // cols + 1, i % cols + 1
        sp = speedups(rows, m=m, baseline=BASELINE)
        shapes = list(sp)
        labels = [f"{n}x{k}" for n, k in shapes]
        for colour, impl in zip(palette, impls):
            fig.add_bar(x=labels, y=[sp[s].get(impl) for s in shapes], name=impl, marker_color=colour,
                        legendgroup=impl, row=row, col=col)
        ideal = [_ideal(by, impls[0], m, n, k) for n, k in shapes]
        fig.add_scatter(x=labels, y=ideal, mode="markers", name="byte ideal (fp16 bytes / stored bytes)",
                        marker=dict(symbol="line-ew-open", size=28, color="black", line=dict(width=3)),
                        legendgroup="ideal", showlegend=i == 0, row=row, col=col)
        fig.add_hline(y=1.0, line_dash="dot", line_color="grey", row=row, col=col)
        fig.update_xaxes(title_text="n x k", row=row, col=col)
        fig.update_yaxes(title_text="× fp16 cuBLAS", row=row, col=col)
    fig.update_layout(title=f"The next versions, side by side: speed-up over fp16 cuBLAS · {source}",
                      barmode="group", height=380 * grid)
    return fig


def span(values: list[float], fmt: str) -> str:
    """The range of ``values`` as "lo-hi", each end formatted with ``fmt``; one value when both ends print alike."""
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}-{format(hi, fmt)}"


def _copy_share(by: dict, impl: str, m: int, shapes: list, copy_gbps: float) -> str:
    shares = [100 * by[(impl, m, n, k)]["gbps"] / copy_gbps for n, k in shapes]
    return f"{span(shares, '.0f')}% of the copy bandwidth"


def version_sentences(result: dict, comparisons=COMPARISONS) -> list[str]:
    """Per comparison and version: its speed-up over fp16 cuBLAS across the shapes, the byte ideal, and the GB/s it
    moves as a share of the copy bandwidth; every number read from ``result``."""
    rows = _rows(result)
    by = _by_key(rows)
    copy_gbps = result.get("copy_gbps")
    out = []
    for _title, m, impls in _present(result, comparisons):
        sp = speedups(rows, m=m, baseline=BASELINE)
        parts = []
        for impl in impls:
            shapes = [s for s in sp if impl in sp[s]]
            text = f"{impl} {span([sp[s][impl] for s in shapes], '.2f')}x"
            if copy_gbps:
                text += f" ({_copy_share(by, impl, m, shapes, copy_gbps)})"
            parts.append(text)
        ideals = [x for x in (_ideal(by, impls[0], m, n, k) for n, k in sp) if x is not None]
        sentence = f"m = {m}, speed-up over fp16 cuBLAS across the {len(sp)} shapes: " + ", ".join(parts)
        if ideals:
            sentence += f"; the bytes allow {span(ideals, '.2f')}x"
        if copy_gbps:
            sentence += f"; fp16 cuBLAS itself runs at {_copy_share(by, BASELINE, m, list(sp), copy_gbps)}"
        out.append(sentence + ".")
    return out


def target_sentences(result: dict, targets=TARGETS) -> list[str]:
    """Issue 16's targets against the recording: the best recorded version per shape, and on how many shapes it
    reaches the target."""
    rows = _rows(result)
    out = []
    for name, m, impls, wanted in targets:
        best = [max(v for i, v in row.items() if i in impls) for row in speedups(rows, m=m, baseline=BASELINE).values()
                if any(i in row for i in impls)]
        if not best:
            continue
        met = sum(b >= wanted for b in best)
        out.append(f"{name} at m = {m}: best version {span(best, '.2f')}x fp16 cuBLAS; target {wanted}x met on "
                   f"{met} of {len(best)} shapes.")
    return out
