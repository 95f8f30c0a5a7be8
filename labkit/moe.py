"""A Mixtral-style sparse MoE block: a router picks experts for each token, only those experts run.

    x (N tokens, H) -> router logits = gate(x) (N, E) -> probs = softmax over the E experts
      token choice  (Mixtral): each token keeps its top-k experts, weights renormalised to sum to 1
          + capacity factor:   each expert takes at most C = ceil(cf * N * k / E) tokens; the rest are
                               dropped (that expert adds nothing for them; the residual still carries them)
      expert choice (Zhou et al. 2022): each expert takes its top-C tokens by probability (C as above)
    -> out[t] = sum over the experts e that took token t of combine[t, e] * expert_e(x[t])
       expert_e(x) = w2(silu(w1 x) * w3 x)                  (SwiGLU, one expert per nn.Module)

Who wins a full expert's last slot decides the output, so every ordering is written down: token choice
serves first choices before second choices, each in batch order (GShard's order); expert choice breaks
equal probabilities by batch order, earlier token first (a stable sort). Tokens of different requests in
one batch compete for the same slots: :mod:`labkit.moe_leak` turns that into an attack.

Parameter names are Hugging Face's classic Mixtral names (``block_sparse_moe.gate``,
``block_sparse_moe.experts.N.w1/w2/w3``), which transformers 5's ``save_pretrained`` still writes; the
fused layout it holds in memory (``mlp.experts.gate_up_proj`` (E, 2I, H), ``mlp.experts.down_proj``
(E, H, I)) is converted by :func:`unfuse_experts` when a checkpoint stores that instead.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.moe import fused_moe
from labkit.config import LlamaConfig
from labkit.device import INTERPRETER, MODE

ROUTINGS = ("token_choice", "expert_choice")
DEFAULT_MOE_DIR = pathlib.Path(__file__).resolve().parents[1] / "data" / "model_moe"  # the shipped MoE (its card)


class Expert(nn.Module):
    """One SwiGLU expert, Mixtral's names: w1 = gate, w3 = up, w2 = down."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@dataclasses.dataclass
class Dispatch:
    """Which expert processes which token, and with what weight. N tokens, E experts."""
    router_logits: torch.Tensor  # (N, E) fp32
    selected: torch.Tensor  # (N, E) bool: expert e runs on token t
    combine: torch.Tensor  # (N, E) fp32: weight of expert e's output in token t's (0 where not selected)
    dropped: torch.Tensor  # (N,) int: top-k choices of the token that a full expert turned away

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        return self.selected.sum(0)  # (E,)


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: an even share of the N * k assignments, times the capacity factor."""
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 (or None for dropless routing), got {capacity_factor}")
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def route_token_choice(router_logits: torch.Tensor, top_k: int, capacity_factor: float | None = None) -> Dispatch:
    """Mixtral's routing: softmax over experts, keep the top-k, renormalise; optionally a capacity per expert."""
    n, e = router_logits.shape
    probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E)
    top_w, top_i = torch.topk(probs, top_k, dim=-1)  # (N, k)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    keep = torch.ones_like(top_i, dtype=torch.bool)  # (N, k)
    if capacity_factor is not None:
        cap = capacity(n, top_k, e, capacity_factor)
        order = top_i.t().reshape(-1)  # (k * N,): every token's first choice in batch order, then the seconds
        onehot = F.one_hot(order, e)  # (k * N, E)
        slot = (onehot.cumsum(0) * onehot).sum(-1) - 1  # position of each assignment in its expert's queue
        keep = (slot < cap).reshape(top_k, n).t()
    selected = torch.zeros(n, e, dtype=torch.bool, device=router_logits.device)
    selected.scatter_(1, top_i, keep)
    combine = torch.zeros(n, e, dtype=torch.float32, device=router_logits.device)
    combine.scatter_(1, top_i, top_w * keep)
    return Dispatch(router_logits, selected, combine, (~keep).sum(-1))


def route_expert_choice(router_logits: torch.Tensor, top_k: int, capacity_factor: float = 1.0) -> Dispatch:
    """Expert choice: each expert takes the C tokens with the highest probability for it; equal
    probabilities go to the earlier token in the batch. A token may get 0..E experts."""
    n, e = router_logits.shape
    probs = torch.softmax(router_logits.float(), dim=-1)  # (N, E)
    cap = min(n, capacity(n, top_k, e, capacity_factor))
    order = torch.sort(probs.t(), dim=-1, descending=True, stable=True).indices[:, :cap]  # (E, C) token ids
    selected = torch.zeros(e, n, dtype=torch.bool, device=router_logits.device)
    selected.scatter_(1, order, True)
    selected = selected.t().contiguous()  # (N, E)
    combine = probs * selected
    wanted = torch.topk(probs, top_k, dim=-1).indices  # what token choice would have given each token
    dropped = (~selected.gather(1, wanted)).sum(-1)
    return Dispatch(router_logits, selected, combine, dropped)


class SparseMoeBlock(nn.Module):
    """forward(x (B, T, H)) -> (B, T, H). Every token of the batch is routed together (B * T tokens).

    ``routing`` and ``capacity_factor`` are serving choices, not checkpoint contents: set them with
    :func:`set_routing`. The default is Mixtral's: token choice, dropless (``capacity_factor=None``).

    ``backend`` (:func:`set_moe_backend`): "torch" runs the per-expert loop (the reference); "triton" the
    grouped-matmul kernel :func:`kernels.moe.fused_moe` (two launches for all experts); "auto" the kernel on a
    GPU and the loop on the CPU. The kernel serves dropless token choice only: with a capacity or expert choice
    "auto" keeps the loop and "triton" is an error."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_experts, self.top_k = config.num_local_experts, config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = nn.ModuleList(Expert(config.hidden_size, config.intermediate_size)
                                     for _ in range(config.num_local_experts))
        self.routing, self.capacity_factor = "token_choice", None
        self.backend = "auto"

    def dispatch(self, x: torch.Tensor) -> Dispatch:
        """Routing decisions for x (N, H)."""
        logits = self.gate(x).float()  # (N, E)
        if self.routing == "expert_choice":
            return route_expert_choice(logits, self.top_k, self.capacity_factor or 1.0)
        return route_token_choice(logits, self.top_k, self.capacity_factor)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        dropless = self.routing == "token_choice" and self.capacity_factor is None
        if self.backend == "triton" and not dropless:
            raise ValueError(f"the MoE kernel serves dropless token choice; this block routes {self.routing!r} with "
                             f"capacity_factor={self.capacity_factor}: use set_moe_backend(model, 'torch' or 'auto')")
        if self.backend == "triton" and not (x.is_cuda or INTERPRETER):
            raise ValueError(f"backend 'triton' needs CUDA tensors here (x is on {x.device}; Triton's interpreter, "
                             "which takes CPU tensors, is off): move the model to the GPU or use backend 'auto'")
        return self.backend == "triton" or (self.backend == "auto" and dropless and MODE == "gpu" and x.is_cuda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        d = self.dispatch(x)
        if self._use_kernel(x):
            top_w, top_i = torch.topk(d.combine, self.top_k, dim=-1)  # (N, k): dropless, k non-zero weights a row
            # Mixtral's per-expert modules are stacked on every call (E * 3 * H * I weights copied): a serving
            # build would store them stacked once
            w13, w2 = stacked_weights(self)
            return fused_moe(x, w13, w2, top_i, top_w).reshape(shape)
        out = torch.zeros_like(x)
        for e in torch.nonzero(d.tokens_per_expert).flatten().tolist():  # experts with no tokens read no weights
            rows = torch.nonzero(d.selected[:, e]).flatten()  # (n_e,)
            y = self.experts[e](x[rows]) * d.combine[rows, e, None]  # (n_e, H), fp32 weights as HF
            out.index_add_(0, rows, y.to(out.dtype))
        return out.reshape(shape)


def moe_blocks(model) -> list[SparseMoeBlock]:
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def _blocks_or_error(model) -> list[SparseMoeBlock]:
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("this model has no MoE blocks (config.num_local_experts is 0); load a mixtral checkpoint")
    return blocks


def set_routing(model, routing: str = "token_choice", capacity_factor: float | None = None) -> None:
    """Switch every MoE block of ``model`` to ``routing`` with ``capacity_factor`` (None: no capacity;
    expert choice always has one, 1.0 if None)."""
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    if capacity_factor is not None and capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor}")
    for b in _blocks_or_error(model):
        b.routing, b.capacity_factor = routing, capacity_factor


def set_moe_backend(model, backend: str = "auto") -> None:
    """Run every MoE block of ``model`` on ``backend``: "auto", "triton" or "torch" (see :class:`SparseMoeBlock`)."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    for b in _blocks_or_error(model):
        b.backend = backend


def active_parameters(model) -> int:
    """Parameters one token's forward uses: all of them, less the experts it is not routed to (top-k of E)."""
    unused = sum(sum(p.numel() for p in b.experts[0].parameters()) * (b.num_experts - b.top_k) for b in moe_blocks(model))
    return model.num_parameters - unused


def stacked_weights(block: SparseMoeBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """(w13 (E, 2I, H) = [w1; w3] of each expert, w2 (E, H, I)): the layout the grouped kernel reads."""
    w13 = torch.stack([torch.cat([ex.w1.weight, ex.w3.weight], 0) for ex in block.experts])
    w2 = torch.stack([ex.w2.weight for ex in block.experts])
    return w13, w2


_FUSED = re.compile(r"^(model\.layers\.\d+)\.mlp\.(gate\.weight|experts\.gate_up_proj|experts\.down_proj)$")


def unfuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers-5 fused Mixtral tensors to the classic per-expert names (others pass through).

    ``L.mlp.gate.weight`` -> ``L.block_sparse_moe.gate.weight``; ``L.mlp.experts.gate_up_proj`` (E, 2I, H)
    -> ``experts.e.w1`` = rows :I, ``experts.e.w3`` = rows I:; ``L.mlp.experts.down_proj`` (E, H, I) -> ``w2``."""
    out = {}
    for name, t in state.items():
        m = _FUSED.match(name)
        if m is None:
            out[name] = t
            continue
        layer, what = m.groups()
        prefix = f"{layer}.block_sparse_moe"
        if what == "gate.weight":
            out[f"{prefix}.gate.weight"] = t
        elif what == "experts.gate_up_proj":
            w1, w3 = t.chunk(2, dim=1)  # (E, I, H) each
            for e in range(t.shape[0]):
                out[f"{prefix}.experts.{e}.w1.weight"], out[f"{prefix}.experts.{e}.w3.weight"] = w1[e], w3[e]
        else:
            for e in range(t.shape[0]):
                out[f"{prefix}.experts.{e}.w2.weight"] = t[e]
    return out


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, averaged over layers: E * sum_e f_e * P_e, where f_e is the share of
    top-k assignments that go to expert e and P_e its mean router probability. 1.0 when perfectly balanced."""
    losses = []
    for logits in router_logits:  # (N, E) per layer
        probs = torch.softmax(logits.float(), dim=-1)
        e = probs.shape[-1]
        f = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, e).float().sum(1).mean(0) / top_k  # (E,)
        losses.append(e * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


# --- routing statistics -----------------------------------------------------------------------------
@torch.no_grad()
def routing_trace(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on ``input_ids`` (B, T) and return which experts each token used: (layers, B * T, E) bool."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("routing_trace needs a model with MoE blocks (a mixtral checkpoint)")
    seen = []
    hooks = [b.register_forward_hook(lambda mod, args, out: seen.append(mod.dispatch(
        args[0].reshape(-1, args[0].shape[-1])).selected)) for b in blocks]
    try:
        model(input_ids)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(seen)


def routing_figure(trace: torch.Tensor, tokens: list[str] | None = None, title: str = "expert load"):
    """Expert load per layer (share of tokens each expert processed) and, if ``tokens`` is given, the experts
    each token used in each layer (one row per token; the colour is the lowest-numbered one)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    layers, n, e = trace.shape
    share = trace.float().mean(1).numpy()  # (L, E)
    rows = 2 if tokens is not None else 1
    fig = make_subplots(rows=rows, cols=1, vertical_spacing=0.1, row_heights=[0.3, 0.7] if rows == 2 else None,
                        subplot_titles=["share of tokens each expert processed, per layer",
                                        "experts each token used, layer by layer"][:rows])
    fig.add_trace(go.Heatmap(z=share, x=[f"expert {i}" for i in range(e)], y=[f"layer {i}" for i in range(layers)],
                             colorscale="Viridis", colorbar=dict(title="share", len=0.3, y=0.86 if rows == 2 else 0.5),
                             hovertemplate="%{y}, %{x}: %{z:.2f} of tokens<extra></extra>"), row=1, col=1)
    if tokens is not None:
        tokens = tokens[:n]
        first = trace.float().argmax(-1).t().numpy()[: len(tokens)]  # (N, L)
        text = [[",".join(str(j) for j in torch.nonzero(trace[layer, t]).flatten().tolist()) for layer in range(layers)]
                for t in range(len(tokens))]
        fig.add_trace(go.Heatmap(z=first, x=[f"layer {i}" for i in range(layers)],
                                 y=[f"{i}: {tok!r}" for i, tok in enumerate(tokens)], text=text, texttemplate="%{text}",
                                 colorscale="Turbo", showscale=False, zmin=0, zmax=e - 1,
                                 hovertemplate="token %{y}, %{x}: experts %{text}<extra></extra>"), row=2, col=1)
        fig.update_yaxes(autorange="reversed", row=2, col=1)
    fig.update_layout(title=title, height=320 + (22 * len(tokens) if tokens is not None else 0))
    return fig
