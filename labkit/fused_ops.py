"""Fused ops for a launch-bound decode step: fewer, bigger kernels (the lesson is in kernels/fused_ops.py).

``fuse_model(model)`` changes a LlamaForCausalLM in place:

    weights     q_proj, k_proj, v_proj -> qkv_proj (rows concatenated: one GEMV reads them all)
                gate_proj, up_proj     -> gate_up_proj
    forwards    the model, each decoder layer, attention and MLP get the fused forwards below:

    h = embed(ids); residual = None
    for layer:                                       # the residual add travels into the next norm's kernel
        x, residual = add_rms_norm(h, residual)      (layer 0: rms_norm(h), residual = h)
        q, k = rope(qkv_proj(x), positions)          one GEMV, one kernel; v is a view of the qkv output
        h = o_proj(cache.attend(q, k, v))
        x, residual = add_rms_norm(h, residual)
        h = down_proj(silu_mul(gate_up_proj(x)))
    logits = lm_head(add_rms_norm(h, residual))      (only the rows of logits_indices)

Fuse *before* quantising (``labkit.quant.quantize_model`` then quantises ``qkv_proj`` and ``gate_up_proj``):
int8 and int4 scales are per output row (int4: per group of a row), so quantising the concatenation gives
exactly the rows that quantising each projection would. ``labkit.ternary`` has one scale per *tensor* and
only knows the unfused names: a fused model is refused there (see :func:`check_fusable_scheme`).

``backend``: "auto" runs the Triton kernels on CUDA and their torch references on the CPU (the same maths);
"triton" forces the kernels (the interpreter on the CPU, for tests), "torch" the references.
``EngineConfig(fused_ops=True)`` fuses the engine's model at construction.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn

from kernels import fused_ops as fk
from labkit.model import LlamaForCausalLM

BACKENDS = ("auto", "triton", "torch")


def is_fused(model: nn.Module) -> bool:
    return isinstance(model, LlamaForCausalLM) and hasattr(model.model.layers[0].self_attn, "qkv_proj")


def check_fusable_scheme(scheme: str) -> None:
    """Raise a ValueError for a weight scheme that cannot quantise a fused model."""
    if scheme == "ternary":
        raise ValueError("ternary weights (labkit.ternary) have one scale per q/k/v/gate/up tensor and are not "
                         "applied to qkv_proj / gate_up_proj; run ternary without fused ops")


def _concat(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose output is the outputs of ``linears`` side by side (weights stacked by rows)."""
    first = linears[0]
    has_bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=has_bias,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if has_bias:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused


def fuse_model(model: LlamaForCausalLM, backend: str = "auto") -> LlamaForCausalLM:
    """Fuse ``model``'s projections and swap in the fused forwards, in place; returns the model.

    Refuses (ValueError, model untouched) a model already fused, one whose projections are already quantised
    (fuse first, then quantise) and an unknown backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"fuse_model takes a labkit.model.LlamaForCausalLM, got {type(model).__name__}")
    if is_fused(model):
        raise ValueError("the model is already fused (it has qkv_proj); fuse_model it once")
    for i, layer in enumerate(model.model.layers):
        parts = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
        if not layer.is_moe:
            parts += [layer.mlp.gate_proj, layer.mlp.up_proj]
        bad = [type(m).__name__ for m in parts if type(m) is not nn.Linear]
        if bad:
            raise ValueError(f"layer {i} has {bad[0]} projections: fuse_model before quantize_model / "
                             "ternarise_model, so that the fused qkv_proj / gate_up_proj are what gets quantised")
    rotary = model.model.rotary_emb
    rotary.register_buffer("cos_sin", fk.rope_cos_sin(rotary.inv_freq, model.config.max_position_embeddings),
                           persistent=False)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.qkv_proj = _concat([attn.q_proj, attn.k_proj, attn.v_proj])
        del attn.q_proj, attn.k_proj, attn.v_proj
        attn.forward = types.MethodType(attention_forward, attn)
        if not layer.is_moe:  # a mixture's experts keep their own forward
            mlp = layer.mlp
            mlp.gate_up_proj = _concat([mlp.gate_proj, mlp.up_proj])
            del mlp.gate_proj, mlp.up_proj
            mlp.forward = types.MethodType(mlp_forward, mlp)
        layer.forward = types.MethodType(decoder_layer_forward, layer)
    model.forward = types.MethodType(causal_lm_forward, model)
    readers = [model.model.norm] + [m for layer in model.model.layers for m in (
        layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn, getattr(layer, "mlp", None)) if m]
    for module in readers:
        module.fused_backend = backend  # read by the ops below: which implementation this module runs
    return model


# ---- op dispatch: the kernel on CUDA (or when forced), else its torch reference -------------------------------
def _kernels(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``module`` (tagged with its backend by fuse_model) runs the Triton kernels for ``x``."""
    return module.fused_backend == "triton" or (module.fused_backend == "auto" and x.is_cuda)


def rms_norm(x: torch.Tensor, norm, residual: torch.Tensor | None):
    """(normed, new residual) of x (B, T, H) with labkit.model.RMSNorm ``norm``; residual None: x is the stream."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    kernels = _kernels(norm, x)
    if residual is None:
        y = (fk.rms_norm if kernels else fk.rms_norm_ref)(x2, norm.weight, norm.eps)
        return y.view(shape), x
    r2 = residual.reshape(-1, shape[-1])
    y, s = (fk.add_rms_norm if kernels else fk.add_rms_norm_ref)(x2, r2, norm.weight, norm.eps)
    return y.view(shape), s.view(shape)


# ---- the fused forwards (bound to the modules by fuse_model) --------------------------------------------------
def attention_forward(self, x, cos_sin, positions, cache, layer_idx):
    B, T, _ = x.shape
    Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
    qkv = self.qkv_proj(x).reshape(B * T, (Hq + 2 * Hkv) * D)  # (B*T, (Hq + 2Hkv) D)
    q, k = (fk.rope if _kernels(self, x) else fk.rope_ref)(qkv, positions.reshape(-1), cos_sin, Hq, Hkv)
    q = q.view(B, T, Hq, D).transpose(1, 2)  # (B, Hq, T, D)
    k = k.view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
    v = qkv.view(B, T, Hq + 2 * Hkv, D)[:, :, Hq + Hkv:].transpose(1, 2)  # (B, Hkv, T, D), a view
    out = cache.attend(layer_idx, q, k, v, positions)  # (B, Hq, T, D)
    return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def mlp_forward(self, x):
    shape = x.shape
    gate_up = self.gate_up_proj(x).reshape(-1, self.gate_up_proj.out_features)  # (B*T, 2I)
    act = (fk.silu_mul if _kernels(self, x) else fk.silu_mul_ref)(gate_up)  # (B*T, I)
    return self.down_proj(act.view(*shape[:-1], -1))


def decoder_layer_forward(self, h, residual, cos_sin, positions, cache, layer_idx):
    """h: the previous layer's output (layer 0: the embedding); returns (this layer's output, residual stream)."""
    x, residual = rms_norm(h, self.input_layernorm, residual)
    h = self.self_attn(x, cos_sin, positions, cache, layer_idx)
    x, residual = rms_norm(h, self.post_attention_layernorm, residual)
    ffn = self.block_sparse_moe if self.is_moe else self.mlp
    return ffn(x), residual


def causal_lm_forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                      logits_indices: torch.Tensor | None = None, validate: bool = True) -> torch.Tensor:
    """LlamaForCausalLM.forward's contract (and checks), through the fused ops."""
    from labkit.kv_cache import NoCache
    from labkit.model import checked_positions

    positions = checked_positions(self.config, input_ids, positions, validate)
    cache = NoCache() if cache is None else cache
    cos_sin = self.model.rotary_emb.cos_sin
    h, residual = self.model.embed_tokens(input_ids), None
    for i, layer in enumerate(self.model.layers):
        h, residual = layer(h, residual, cos_sin, positions, cache, i)
    if logits_indices is not None:  # the norm is row-wise: pick the rows first, then add and normalise only those
        h, residual = h[:, logits_indices], residual[:, logits_indices]  # (B, K, hidden)
    x, _ = rms_norm(h, self.model.norm, residual)
    return self.lm_head(x)
