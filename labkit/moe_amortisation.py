"""How batching amortises weight reads in an MoE layer: distinct experts touched grow with the batch.

A dense decode step reads every weight once whatever the batch, so bytes per token fall as 1/B. An MoE
step reads only the experts some token chose. With top-k of E experts and routing that looks uniform,
one token leaves a given expert out with probability (1 - k/E), so B independent tokens touch

    E_touched(B) = E * (1 - (1 - k/E) ** B)          experts (k at B = 1, -> E as B grows)

and the step reads E_touched(B) * bytes_per_expert: per token that is bytes_per_expert * E_touched(B) / B,
which falls slowly while B is small (each new token brings new experts) and like 1/B once all E are read.
Real routers are not uniform (some experts are hot), which touches fewer experts than the formula.
"""
from __future__ import annotations

import torch


def expected_experts_touched(batch: int, num_experts: int, top_k: int) -> float:
    """E * (1 - (1 - k/E)^B): distinct experts B tokens touch when each picks a uniform k-subset of E."""
    if not 0 < top_k <= num_experts or batch < 0:
        raise ValueError(f"need 0 < top_k ({top_k}) <= num_experts ({num_experts}) and batch >= 0 ({batch})")
    return num_experts * (1 - (1 - top_k / num_experts) ** batch)


def experts_touched(topk_ids: torch.Tensor) -> int:
    """Distinct experts in a step's routing (N, k); -1 entries (dropped pairs) do not count."""
    ids = topk_ids.reshape(-1)
    return int(torch.unique(ids[ids >= 0]).numel())


def uniform_topk(batch: int, num_experts: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, k) expert ids: each token a uniform random k-subset (the formula's assumption)."""
    return torch.rand(batch, num_experts, generator=generator).argsort(-1)[:, :top_k]


def measured_experts_touched(batch: int, num_experts: int, top_k: int, trials: int = 200, seed: int = 0) -> float:
    """Mean distinct experts over ``trials`` random uniform routings of ``batch`` tokens."""
    g = torch.Generator().manual_seed(seed)
    return sum(experts_touched(uniform_topk(batch, num_experts, top_k, g)) for _ in range(trials)) / trials


def decode_weight_bytes(batch: int, num_experts: int, top_k: int, bytes_per_expert: int,
                        touched: float | None = None) -> dict:
    """Weight bytes one decode step of ``batch`` tokens reads, per implementation:

    moe: touched experts (the formula if ``touched`` is None); dense_total: a dense MLP as big as all E
    experts; dense_active: a dense MLP as big as the k experts one token uses (the same FLOPs per token)."""
    t = expected_experts_touched(batch, num_experts, top_k) if touched is None else touched
    return {"moe": t * bytes_per_expert, "dense_total": num_experts * bytes_per_expert,
            "dense_active": top_k * bytes_per_expert}


def amortisation_figure(num_experts: int, top_k: int, bytes_per_expert: int, batches=(1, 2, 4, 8, 16, 32, 64, 128),
                        measured: dict | None = None, title: str | None = None):
    """Weight bytes per decode step and per token against batch size: dense vs MoE, predicted (lines) and
    ``measured`` ({batch: experts touched}, markers) if given."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    batches = list(batches)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["weight bytes read per step", "weight bytes per token"])
    rows = [decode_weight_bytes(b, num_experts, top_k, bytes_per_expert) for b in batches]
    styles = {"moe": ("MoE, E(1-(1-k/E)^B) experts", "firebrick", "solid"),
              "dense_total": ("dense, all E experts' size", "royalblue", "dash"),
              "dense_active": ("dense, k experts' size (same FLOPs)", "seagreen", "dot")}
    for key, (name, color, dash) in styles.items():
        for col, per_token in ((1, False), (2, True)):
            y = [r[key] / (b if per_token else 1) / 1e6 for r, b in zip(rows, batches)]
            fig.add_trace(go.Scatter(x=batches, y=y, name=name, legendgroup=key, showlegend=col == 1,
                                     line=dict(color=color, dash=dash)), row=1, col=col)
    if measured:
        bs = sorted(measured)
        for col, per_token in ((1, False), (2, True)):
            y = [measured[b] * bytes_per_expert / (b if per_token else 1) / 1e6 for b in bs]
            fig.add_trace(go.Scatter(x=bs, y=y, mode="markers", name="MoE, measured experts touched",
                                     legendgroup="measured", showlegend=col == 1,
                                     marker=dict(color="black", symbol="x", size=8)), row=1, col=col)
    fig.update_xaxes(type="log", title="batch (tokens in the decode step)")
    fig.update_yaxes(type="log", title="MB")
    fig.update_layout(title=title or f"E = {num_experts} experts, top-{top_k}: what a decode step reads", height=420)
    return fig


def _main() -> None:
    """``python -m labkit.moe_amortisation``: predicted vs sampled experts touched, Mixtral's E = 8, k = 2."""
    print(f"{'batch':>6} {'predicted':>10} {'sampled':>9}   (E = 8, top-2; experts a decode step reads)")
    for b in (1, 2, 4, 8, 16, 32, 64):
        print(f"{b:>6} {expected_experts_touched(b, 8, 2):>10.3f} {measured_experts_touched(b, 8, 2):>9.3f}")


if __name__ == "__main__":
    _main()


def bench_figure(data: dict):
    """Replot data/bench/moe.json: time per MoE layer against batch, per implementation and shape, with the
    bandwidth floor (weight bytes the step must read / the recorded copy bandwidth) as a dashed line."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    shapes = list(data["shapes"])
    fig = make_subplots(rows=1, cols=len(shapes), subplot_titles=[
        f"{n}: H {s['hidden']}, I {s['inter']}, E {s['experts']}, top-{s['top_k']}" for n, s in data["shapes"].items()])
    colors = {"labkit_fused_moe": "firebrick", "torch_expert_loop": "gray", "torch_grouped_mm": "darkorange",
              "dense_active": "seagreen"}
    for col, shape in enumerate(shapes, start=1):
        for impl, color in colors.items():
            rows = sorted((r for r in data["rows"] if r["shape"] == shape and r["impl"] == impl and "median_ms" in r),
                          key=lambda r: r["batch"])
            if rows:
                fig.add_trace(go.Scatter(x=[r["batch"] for r in rows], y=[r["median_ms"] * 1e3 for r in rows],
                                         name=impl, legendgroup=impl, showlegend=col == 1, mode="lines+markers",
                                         line=dict(color=color)), row=1, col=col)
            if impl in ("labkit_fused_moe", "dense_active") and rows and data.get("copy_gbps"):
                floor = [r["weight_bytes"] / (data["copy_gbps"] * 1e9) * 1e6 for r in rows]
                fig.add_trace(go.Scatter(x=[r["batch"] for r in rows], y=floor, name=f"{impl}: bytes / copy bandwidth",
                                         legendgroup=impl + "floor", showlegend=col == 1,
                                         line=dict(color=color, dash="dash")), row=1, col=col)
    fig.update_xaxes(type="log", title="batch (tokens)")
    fig.update_yaxes(type="log", title="µs per MoE layer")
    prov = data.get("provenance", {})
    fig.update_layout(title=f"one MoE layer's experts, {data.get('dtype')}, {prov.get('device')} "
                            f"(torch {prov.get('torch')}, triton {prov.get('triton')})", height=430)
    return fig
