"""Notebook 05's figures: recorded (or live) paged decode-attention results against the copy bandwidth.

``results`` is what ``python -m labkit.bench paged_attention`` records (``data/bench/paged_attention.json``) or
what ``labkit.bench.paged_attention.run`` returns live on a GPU: ``rows`` of impl / dtype / batch / context /
block_size / median_ms / gbps, and ``copy_gbps``, the device-to-device copy bandwidth of the same run.
"""
from __future__ import annotations

import plotly.graph_objects as go

IMPLS = ("labkit_v1", "labkit_v2", "labkit_v3", "labkit_v4", "sdpa_dense", "flex_paged")  # those recorded are drawn
KV_HEADS, HEAD_DIM, ELEM_BYTES = 8, 128, 2  # the benchmark's shapes: 8 KV heads, head_dim 128, fp16/bf16


def shape_rows(results: dict) -> list[dict]:
    """The rows of the batch x context grid (the block-size sweep left out), each with a bandwidth."""
    return [r for r in results["rows"] if "gbps" in r and "sweep" not in r]


def impls_in(rows: list[dict]) -> list[str]:
    return [i for i in IMPLS if any(r["impl"] == i for r in rows)]


def _shapes(rows):
    return sorted({(r["batch"], r["context"]) for r in rows})


def bandwidth_figure(results: dict, dtype: str, source: str) -> go.Figure:
    """One line per implementation across the shapes; the dashed line is the copy bandwidth."""
    rows = shape_rows(results)
    shapes = _shapes(rows)
    fig = go.Figure()
    for impl in impls_in(rows):
        by_shape = {(r["batch"], r["context"]): r["gbps"] for r in rows if r["impl"] == impl and r["dtype"] == dtype}
        fig.add_scatter(x=[f"{b} x {c}" for b, c in shapes], y=[by_shape.get(s) for s in shapes],
                        mode="lines+markers", name=impl)
    fig.add_hline(y=results["copy_gbps"], line_dash="dash", annotation_text="device-to-device copy")
    fig.update_layout(title=f"Paged decode attention, {dtype}: KV bytes read per second · {source}",
                      xaxis_title="batch x context (tokens)", yaxis_title="GB/s", height=420)
    return fig


def kv_gigabytes(row: dict) -> float:
    """Bytes of K and V one call reads (both, every KV head), in GB."""
    return 2 * row["batch"] * row["context"] * KV_HEADS * HEAD_DIM * ELEM_BYTES / 1e9


def time_against_bytes_figure(results: dict, source: str) -> go.Figure:
    """The roofline in time: median time against KV bytes, and the line bytes / copy bandwidth."""
    rows, copy_gbps = shape_rows(results), results["copy_gbps"]
    fig = go.Figure()
    for impl in impls_in(rows):
        pts = [r for r in rows if r["impl"] == impl]
        fig.add_scatter(x=[kv_gigabytes(r) for r in pts], y=[r["median_ms"] for r in pts], mode="markers", name=impl,
                        text=[f"{r['dtype']} {r['batch']}x{r['context']}" for r in pts])
    xs = sorted({kv_gigabytes(r) for r in rows})
    fig.add_scatter(x=xs, y=[1e3 * gb / copy_gbps for gb in xs], mode="lines", name="bytes / copy bandwidth",
                    line=dict(dash="dash", color="black"))
    fig.update_layout(title=f"Decode attention time against KV bytes · {source}", xaxis_type="log", yaxis_type="log",
                      xaxis_title="K and V read (GB)", yaxis_title="median time (ms)", height=420)
    return fig


def copy_fraction_lines(results: dict, dtype: str = "fp16") -> list[str]:
    """Per shape, each implementation's best bandwidth as a fraction of the copy bandwidth."""
    rows, copy_gbps = shape_rows(results), results["copy_gbps"]
    lines = []
    for shape in _shapes(rows):
        parts = []
        for impl in impls_in(rows):
            cands = [r for r in rows if r["impl"] == impl and r["dtype"] == dtype and (r["batch"], r["context"]) == shape]
            if cands:
                parts.append(f"{impl} {max(r['gbps'] for r in cands) / copy_gbps:4.0%}")
        lines.append(f"{shape[0]:3d} x {shape[1]:5d}: " + ", ".join(parts))
    return lines


def block_size_figure(results: dict, source: str) -> tuple[go.Figure | None, str]:
    """(bar chart of the block-size sweep, a line on it), or (None, why there is none)."""
    sweep = [r for r in results["rows"] if r.get("sweep") == "block_size" and "gbps" in r]
    if not sweep:
        return None, "no block-size sweep in these results (the live run skips it)"
    r0 = sweep[0]
    fig = go.Figure(go.Bar(x=[str(r["block_size"]) for r in sweep], y=[r["gbps"] for r in sweep],
                           text=[r["impl"] for r in sweep]))
    fig.add_hline(y=results["copy_gbps"], line_dash="dash", annotation_text="device-to-device copy")
    fig.update_layout(title=f"Block size, {r0['dtype']} batch {r0['batch']} x context {r0['context']} · {source}",
                      xaxis_title="block_size (tokens)", yaxis_title="GB/s", height=360)
    lo, hi = min(r["gbps"] for r in sweep), max(r["gbps"] for r in sweep)
    return fig, f"slowest block size {100 * (1 - lo / hi):.1f}% below the fastest"


class BandwidthExplorer:
    """A dtype dropdown over ``bandwidth_figure``; ``explorer.figure`` is the figure last drawn."""

    def __init__(self, results: dict, source: str):
        import ipywidgets as W

        self.results, self.source = results, source
        self.dtype = W.Dropdown(options=sorted({r["dtype"] for r in shape_rows(results)}), description="dtype")
        self.out = W.Output()
        self.figure: go.Figure | None = None
        self.dtype.observe(lambda _change: self.update(), names="value")
        self.widget = W.VBox([self.dtype, self.out])

    @property
    def controls(self):
        return (self.dtype,)

    def update(self) -> None:
        self.figure = bandwidth_figure(self.results, self.dtype.value, self.source)
        self.out.clear_output(wait=True)
        with self.out:
            self.figure.show()


def copy_share_figure(results: dict, source: str, dtype: str = "fp16") -> go.Figure:
    """Bars per shape (batch x context): each implementation's best bandwidth as a share of the copy bandwidth."""
    rows, copy_gbps = [r for r in shape_rows(results) if r["dtype"] == dtype], results["copy_gbps"]
    shapes = _shapes(rows)
    fig = go.Figure()
    for impl in impls_in(rows):
        best = {}
        for r in rows:
            if r["impl"] == impl:
                best[(r["batch"], r["context"])] = max(best.get((r["batch"], r["context"]), 0.0), r["gbps"])
        fig.add_bar(x=[f"{b} x {c}" for b, c in shapes], y=[100 * best[s] / copy_gbps if s in best else None
                                                            for s in shapes], name=impl)
    fig.add_hline(y=100, line_dash="dash", annotation_text="device-to-device copy")
    fig.update_layout(title=f"Paged decode attention, {dtype}: % of the copy bandwidth · {source}", barmode="group",
                      xaxis_title="batch x context (tokens)", yaxis_title="% of copy bandwidth", height=400)
    return fig


def split_k_sentences(results: dict, dtype: str = "fp16", new: str = "labkit_v4", old: str = "labkit_v3") -> list[str]:
    """Per shape, ``new`` against ``old`` (ratio of their best bandwidths: > 1 means faster) and each as a share of the
    copy bandwidth; then which split-K version ``auto`` runs in the recording."""
    rows, copy_gbps = [r for r in shape_rows(results) if r["dtype"] == dtype], results["copy_gbps"]
    out = []
    for shape in _shapes(rows):
        best = {}
        for r in rows:
            if (r["batch"], r["context"]) == shape and r["impl"] in (new, old):
                best[r["impl"]] = max(best.get(r["impl"], 0.0), r["gbps"])
        if len(best) == 2:
            ratio = best[new] / best[old]
            out.append(f"{shape[0]} x {shape[1]}: {new} moves {ratio:.2f}x {old}'s bytes per second "
                       f"({'faster' if ratio > 1 else 'slower'}; {best[new] / copy_gbps:.0%} against "
                       f"{best[old] / copy_gbps:.0%} of the copy bandwidth).")
    if "split_k_version" in results:
        out.append(f"In this recording version='auto' runs {results['split_k_version']} at small batch.")
    return out


def profile_sentences(profile: dict) -> list[str]:
    """From ``python -m labkit.bench paged_profile``: per implementation and shape, one CUDA-graph replay against its
    kernels alone under Nsight Compute (each kernel's time, share of the copy bandwidth, occupancy and waves)."""
    out = []
    for r in profile["rows"]:
        kernels = [k for k in r.get("kernels", []) if k.get("kernel_us")]
        if not kernels:
            continue
        parts = [f"{k['name'].split('(')[0][:48]} {k['kernel_us']:.1f} µs at {k['pct_of_copy']:.0f}% of the copy "
                 f"(occupancy {k['occupancy_achieved_pct']:.0f}%, {k['waves_per_sm']:.2f} waves)" for k in kernels]
        alone = sum(k["kernel_us"] for k in kernels)
        out.append(f"{r['impl']} at {r['batch']} x {r['context']}: one replay {r['graph_us']:.1f} µs "
                   f"({r['graph_pct_of_copy']:.0f}% of the copy); its kernels alone: " + "; ".join(parts)
                   + f"; the replay takes {r['graph_us'] - alone:.1f} µs more than they do.")
    return out
