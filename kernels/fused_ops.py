"""Fused decode ops: residual add + RMSNorm, SiLU(gate) * up, RoPE on q and k, one kernel each.

What you will learn
-------------------
* **A decode step of a small model is launch-bound.** At batch 1 a step reads every weight once: the 1B-class model
  (16 layers, hidden 2048) reads ~1.2 GB in ~0.6 ms at H200 bandwidth. But written as torch formulas, each layer
  launches ~42 kernels, ~30 of them elementwise ops on a few kilobytes: RMSNorm alone is ``float() -> pow -> mean ->
  + eps -> rsqrt -> * -> to(dtype) -> * weight``, eight launches to normalise one 4 kB row. A kernel costs ~2-3 us of
  launch, ramp-up and drain however little it does, so ~570 such kernels cost more than all the weight reads;
  quantising the weights (fewer bytes) then barely moves the step. A CUDA graph removes the CPU's launch overhead,
  not the GPU's per-kernel cost: the fix is fewer kernels.
* **Fusion**: one program does the whole formula on a row held in registers, reading and writing it once.

    per layer, decode                       torch formulas               fused (this file + labkit/fused_ops.py)
    RMSNorm (input)                         8 (float, pow, mean, add,    1  rms_norm            (layer 0 only; then
                                            rsqrt, mul, cast, mul)          the add below also does it)
    residual add + RMSNorm (post-attn)      1 + 8                        1  add_rms_norm
    q, k, v projections                     3 GEMV                       1  GEMV of the concatenated qkv_proj
    RoPE on q and k                         2 x (mul, chunk, neg, cat,   1  rope (cos/sin read from a table by
                                            mul, add) = 10; + the cos /     position, built once per model)
                                            sin tables, 7 per step
    q made contiguous for attention         1 copy                       0  rope writes q contiguous
    gate, up projections                    2 GEMV                       1  GEMV of gate_up_proj
    SiLU(gate) * up                         2 (silu, mul)                1  silu_mul
    residual add after the MLP              1                            0  done by the next layer's add_rms_norm

  About 42 -> 11 kernels a layer (cache write, attention, o_proj and down_proj stay as they were).

The algorithms (one program per token row; ``H`` hidden, ``I`` intermediate, ``D`` head_dim)::

    add_rms_norm(x, residual, w):               # rms_norm: the same without residual
        s = x + residual            (rounded to the dtype: it *is* the new residual stream)
        y = s * rsqrt(mean(s^2) + eps)      in fp32, then rounded to the dtype, times w  (labkit.model.RMSNorm)
        store y, s

    silu_mul(gu):                               # gu = [gate | up], (T, 2I)
        out = silu(gu[:I]) * gu[I:]

    rope(qkv, positions, cos_sin):              # qkv = [q heads | k heads | v heads], (T, (Hq + 2Hkv) D)
        c, s = cos_sin[pos, :D/2], cos_sin[pos, D/2:]           # cos / sin of pos * inv_freq
        for every q and k head:  x1, x2 = x[:D/2], x[D/2:]      # rotate_half's convention (not interleaved)
            out = [x1 c - x2 s,  x2 c + x1 s]                  # = x * cos + rotate_half(x) * sin

Maths in fp32; outputs in the input dtype, rounded where labkit.model rounds (the normalised row before the
weight, silu before the product, cos / sin tables) so bf16 results stay within an ulp of the torch formulas.
Nothing here reads a value back to the host: the ops can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch

import labkit.device  # noqa: F401  (switches Triton to its interpreter when there is no GPU)
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- references (plain torch, the same maths) ----------------------------------------------------------------
def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """labkit.model.RMSNorm's formula: x (..., H) -> (..., H) in x's dtype."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the model's ``h = h + f(h)`` then the next RMSNorm."""
    s = x + residual
    return rms_norm_ref(s, weight, eps), s


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2I) -> (..., I): silu(gate) * up, as labkit.model.MLP with gate and up concatenated."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """(max_positions, D) fp32 table: [cos(p * inv_freq) | sin(p * inv_freq)] per position p.

    The product is labkit.model.RotaryEmbedding's (``positions.float() * inv_freq`` in fp32) and the cos / sin are
    torch's, so a row holds exactly the values the unfused model computes for that position."""
    freqs = torch.arange(max_positions, device=inv_freq.device).float()[:, None] * inv_freq  # (P, D/2)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def rope_ref(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, num_heads: int,
             num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (T, (Hq + 2Hkv) D), positions (T,) -> q (T, Hq, D), k (T, Hkv, D) rotated (labkit.model's convention)."""
    T = qkv.shape[0]
    D = cos_sin.shape[1]
    heads = qkv.view(T, num_heads + 2 * num_kv_heads, D)[:, :num_heads + num_kv_heads]  # (T, Hq + Hkv, D)
    table = cos_sin[positions.long()]  # (T, D)
    cos, sin = table.chunk(2, dim=-1)
    cos = torch.cat((cos, cos), dim=-1).to(qkv.dtype)[:, None]  # (T, 1, D), rounded as the model rounds it
    sin = torch.cat((sin, sin), dim=-1).to(qkv.dtype)[:, None]
    x1, x2 = heads.chunk(2, dim=-1)
    rotated = heads * cos + torch.cat((-x2, x1), dim=-1) * sin  # x * cos + rotate_half(x) * sin
    return rotated[:, :num_heads].contiguous(), rotated[:, num_heads:].contiguous()


# ---- kernels --------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, H]
    residual_ptr,  # [T, H] (read only when HAS_RESIDUAL)
    weight_ptr,  # [H]
    out_ptr,  # [T, H] contiguous
    residual_out_ptr,  # [T, H] contiguous: x + residual (written only when HAS_RESIDUAL)
    stride_x, stride_r,
    H, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)  # in the dtype, as the model
        tl.store(residual_out_ptr + row * H + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / H + eps)
    y = (x32 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded before the weight, as RMSNorm does
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,  # [T, 2I]: gate then up
    out_ptr,  # [T, I] contiguous
    stride_gu,
    I,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(gate_up_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_gu + I + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu, rounded
    tl.store(out_ptr + row * I + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_heads(src_ptr, dst_ptr, c, s, NUM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate NUM heads of D = 2 * HALF values at src (row-major heads) into dst; c, s: (1, HALF) fp32."""
    h = tl.arange(0, BLOCK_H)[:, None]
    j = tl.arange(0, HALF)[None, :]
    mask = (h < NUM) & (j < HALF)
    offs = h * (2 * HALF) + j  # (BLOCK_H, HALF): first halves; + HALF: second halves
    x1 = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + offs, (x1 * c - x2 * s).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst_ptr + offs + HALF, (x2 * c + x1 * s).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    qkv_ptr,  # [T, (Hq + 2 Hkv) * D]: q heads, k heads, v heads
    positions_ptr,  # [T] int32/int64
    cos_sin_ptr,  # [max_positions, D] fp32: cos | sin
    q_out_ptr,  # [T, Hq, D] contiguous
    k_out_ptr,  # [T, Hkv, D] contiguous
    stride_qkv, max_positions,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(positions_ptr + t)
    pos = tl.minimum(tl.maximum(pos, 0), max_positions - 1)  # never read outside the table (the engine checks)
    j = tl.arange(0, HALF)[None, :]
    c = tl.load(cos_sin_ptr + pos * (2 * HALF) + j)  # (1, HALF)
    s = tl.load(cos_sin_ptr + pos * (2 * HALF) + HALF + j)
    c = c.to(qkv_ptr.dtype.element_ty).to(tl.float32)  # the model's tables are in its dtype
    s = s.to(qkv_ptr.dtype.element_ty).to(tl.float32)
    row = qkv_ptr + t * stride_qkv
    _rope_heads(row, q_out_ptr + t * NUM_HEADS * 2 * HALF, c, s, NUM_HEADS, HALF, BLOCK_HQ)
    _rope_heads(row + NUM_HEADS * 2 * HALF, k_out_ptr + t * NUM_KV_HEADS * 2 * HALF, c, s, NUM_KV_HEADS, HALF,
                BLOCK_HKV)


# ---- wrappers -------------------------------------------------------------------------------------------------
def _check(name: str, t, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}'s last dim must be contiguous (stride 1), got strides {t.stride()}; "
                         "call .contiguous()")
    if t.device.type == "cpu" and not labkit.device.INTERPRETER:
        raise ValueError(f"{name} is on the CPU but Triton compiles for the GPU here: move it to 'cuda'")


def _check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if t.dtype not in DTYPES or (dtype is not None and t.dtype != dtype):
        raise ValueError(f"{name} has dtype {t.dtype}; expected {dtype or DTYPES}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x (T, H) -> rms_norm(x) (T, H); with ``residual`` (T, H): (rms_norm(x + residual), x + residual)."""
    _check("x", x, 2)
    _check_dtype("x", x)
    _check("weight", weight, 1)
    T, H = x.shape
    if weight.shape != (H,):
        raise ValueError(f"weight must be ({H},) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if residual is not None:
        _check("residual", residual, 2)
        _check_dtype("residual", residual, x.dtype)
        if residual.shape != x.shape:
            raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(out) if residual is not None else out
    if T:
        block = triton.next_power_of_2(H)
        _rms_norm_kernel[(T,)](x, residual if residual is not None else x, weight, out, new_residual,
                               x.stride(0), (residual if residual is not None else x).stride(0), H, eps,
                               HAS_RESIDUAL=residual is not None, BLOCK=block,
                               num_warps=min(16, max(1, block // 256)))
    return (out, new_residual) if residual is not None else out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), one kernel; x, residual (T, H). Signature of add_rms_norm_ref."""
    return rms_norm(x, weight, eps, residual=residual)


SILU_BLOCK = 1024  # columns of the output per program: I = 8192 at batch 1 gives 8 programs


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (T, 2I) -> silu(gate) * up (T, I), one kernel."""
    _check("gate_up", gate_up, 2)
    _check_dtype("gate_up", gate_up)
    T, two_i = gate_up.shape
    if two_i % 2:
        raise ValueError(f"gate_up's last dim must be 2 * intermediate_size (even), got {two_i}")
    out = torch.empty(T, two_i // 2, dtype=gate_up.dtype, device=gate_up.device)
    if T:
        block = min(SILU_BLOCK, triton.next_power_of_2(two_i // 2))
        _silu_mul_kernel[(T, triton.cdiv(two_i // 2, block))](gate_up, out, gate_up.stride(0), two_i // 2,
                                                                BLOCK=block, num_warps=4)
    return out


def rope(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, num_heads: int,
         num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (T, (Hq + 2Hkv) D), positions (T,), cos_sin (max_positions, D) fp32 (:func:`rope_cos_sin`)
    -> q (T, Hq, D), k (T, Hkv, D), rotated and contiguous (v stays where it is in qkv). One kernel."""
    _check("qkv", qkv, 2)
    _check_dtype("qkv", qkv)
    _check("cos_sin", cos_sin, 2)
    _check_dtype("cos_sin", cos_sin, torch.float32)
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.dtype not in (torch.int32,
                                                                                                   torch.int64):
        raise ValueError("positions must be a 1-D int32/int64 tensor (one per token)")
    T = qkv.shape[0]
    D = cos_sin.shape[1]
    if D < 2 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two >= 2 for the fused RoPE kernel, got {D}")
    if qkv.shape[1] != (num_heads + 2 * num_kv_heads) * D:
        raise ValueError(f"qkv is {tuple(qkv.shape)}; expected (T, (num_heads + 2 * num_kv_heads) * head_dim) = "
                         f"(T, {(num_heads + 2 * num_kv_heads) * D})")
    if positions.shape != (T,):
        raise ValueError(f"positions must be ({T},), got {tuple(positions.shape)}")
    if len({qkv.device, positions.device, cos_sin.device}) != 1:
        raise ValueError("qkv, positions and cos_sin must be on one device")
    q = torch.empty(T, num_heads, D, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(T, num_kv_heads, D, dtype=qkv.dtype, device=qkv.device)
    if T:
        _rope_kernel[(T,)](qkv, positions, cos_sin, q, k, qkv.stride(0), cos_sin.shape[0],
                           NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=D // 2,
                           BLOCK_HQ=triton.next_power_of_2(num_heads), BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
                           num_warps=2)
    return q, k
