"""int4 weights at batch 2-16: swap A and B, so the tensor core's big side is spent on weights (Marlin's idea).

What you will learn
- Why the GEMM of :mod:`kernels.quant_matmul` wastes the MMA at small batch: it computes
  ``y[BLOCK_M, BLOCK_N] = x[BLOCK_M, K] @ W^T[K, BLOCK_N]`` with x as the MMA's M operand, and M is the
  side a tensor-core instruction fixes at 16 (mma.sync) or 64 (Hopper's wgmma). At m = 4 three quarters
  of every MMA multiply zero rows of x, and the tile holds only BLOCK_N = 32 rows of W, so each step
  streams few weight bytes per instruction. Weight bytes are what decode pays for.
- Swap-AB: compute ``y^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, K] @ x^T[K, BLOCK_M]`` instead. Now the
  dequantised weight tile is the M operand (64-128 rows: a full MMA, wgmma-sized on Hopper) and x's
  m <= 16 rows are the N operand, padded to 16 (the smallest N ``tl.dot`` takes). The same MMAs do the
  same work, but each one consumes four to eight times more weights, and W's tile is read along its rows,
  as it lies in memory. Marlin (Frantar et al. 2024) and vLLM / TensorRT-LLM's mixed-input GEMMs do this.
- The output comes out transposed, ``acc[n, m]``: the store writes it to y[m, n] (a strided store of
  at most 16 x BLOCK_N values, nothing next to the K-long stream of W).

Layout: :mod:`kernels.quant_matmul_int4`'s packed int4 groups (its module docstring): the G/2 bytes of group g
hold codes of k = gG + j in their low nibbles and k = gG + G/2 + j in their high nibbles, j < G/2.

Blocked algorithm (one program per (BLOCK_N rows of W, BLOCK_M rows of x, split of k))::

    acc[BLOCK_N, BLOCK_M] = 0                                      # fp32, y^T's tile
    for each step of GROUPS groups (tl.range, num_stages deep: the next steps' loads in flight):
        for each group g of the step:
            p     = packed[n-block, g]                             # [BN, G/2] u8: the only read of W
            lo    = (0x6400 | (p & 15)) as fp16 - (1024 + zero)    # exact: codes of k = gG .. gG + G/2 - 1
            hi    = (0x6400 | (p >> 4)) as fp16 - (1024 + zero)    # codes of k = gG + G/2 .. gG + G - 1
            x_lo, x_hi = x[m-block, those k]^T                      # [G/2, BM], rows past m clamped
            acc  += (lo @ x_lo + hi @ x_hi) * scale[n-block, g]    # two tl.dot, one scale per group
    y[m-block, n-block] = acc^T

Tricks (constexprs, so the plainer version stays next to each):
- The magic number dequant of :mod:`kernels.quant_matmul`'s GEMM: ``0x6400 | q`` read as fp16 is 1024 + q
  (bf16: ``0x4300 | q`` is 128 + q; fp32 x: ``0x4B000000 | q`` is 2**23 + q), so one OR and one subtract,
  both exact, turn a code minus its zero into a dot operand; no int-to-float conversion.
- ``SCALE_TILE``: multiply the dequantised tile by its group's scale before the dot (one HMUL2 per two
  weights, rounded to x's dtype like an fp16 weight) so the groups of a step share one accumulating dot,
  instead of one fp32 multiply-add per output per group. Off by default: exact scales, as the GEMM.
- ``SPLIT_K``: for short n (4096 rows / 64 = 64 programs for an H200's 132 SMs) k is split over programs
  whose fp32 partial sums torch adds afterwards (two small extra kernels).
- Rows of W past n and of x past m are clamped, not masked: their loads stay in bounds, their outputs are
  never stored, and unmasked loads cost no zeroing moves.

The plain-torch reference is :func:`kernels.quant_matmul.int4_matmul_ref` (same layout, same maths);
``int4_matmul(..., config=dict(path="small_m", ...))`` reaches this kernel, and is its checked wrapper.
"""
from __future__ import annotations

import torch

import labkit.device  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import triton
import triton.language as tl

from kernels.quant_matmul import (_dot_types, _magic, _split, default_config, int4_matmul,  # noqa: F401
                                  int4_matmul_ref)

SMALL_M_BLOCK_M = (16, 32, 64)  # x's rows per program: 16 is the smallest N operand tl.dot accepts


@triton.jit
def _int4_small_m_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32, unit stride along K
    w_ptr,  # [N, KP // 2] uint8, two codes a byte (the group layout above), row stride stride_wn
    s_ptr,  # [N, KP // GROUP] scales
    z_ptr,  # [N, KP // GROUP] uint8 zero points 0..15
    y_ptr,  # [M, N] x's dtype, or [SPLIT_K, M, N] fp32 partial sums
    M, N, K, KP,
    stride_xm, stride_wn, stride_ym, stride_ys,
    SPLIT_LEN,  # groups each split (program_id 2) covers, a multiple of GROUPS
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,  # rows of W per program: the MMA's M side (64-128 fills a Hopper wgmma)
    BLOCK_M: tl.constexpr,  # rows of x per program: the MMA's N side, m padded to it
    GROUPS: tl.constexpr,  # groups per loop step (unrolled)
    STAGES: tl.constexpr,  # loop steps whose loads tl.range keeps in flight
    SCALE_TILE: tl.constexpr,  # scale the dequantised tile (one dot per step) instead of each group's dot
    EVEN_K: tl.constexpr,  # K == KP and every split holds whole steps: no load needs a mask
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BITS_DTYPE: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_VALUE: tl.constexpr,  # see quant_matmul._magic()
):
    HALF: tl.constexpr = GROUP // 2
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    rows_w = tl.minimum(offs_n, N - 1)  # clamped: in bounds, never stored
    rows_x = tl.minimum(offs_m, M - 1)
    offs_j = tl.arange(0, HALF)
    num_groups = KP // GROUP
    w_rows = w_ptr + rows_w[:, None] * stride_wn  # (BN, 1): W's tile read along its rows
    x_cols = x_ptr + rows_x[None, :] * stride_xm  # (1, BM): x^T's columns
    s_rows = s_ptr + rows_w * num_groups  # (BN,)
    z_rows = z_ptr + rows_w * num_groups
    g_start = tl.program_id(2) * SPLIT_LEN
    g_end = tl.minimum(g_start + SPLIT_LEN, num_groups)
    k_end = tl.minimum(K, g_end * GROUP)  # inputs this split may read
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)  # y^T's tile
    for g0 in tl.range(g_start, g_end, GROUPS, num_stages=STAGES):
        for gi in tl.static_range(GROUPS):
            g = g0 + gi
            k_lo = g * GROUP + offs_j  # (G/2,): inputs of the low nibbles; + G/2: of the high ones
            if EVEN_K:
                p = tl.load(w_rows + (g * HALF + offs_j)[None, :])  # (BN, G/2) uint8
                x_lo = tl.load(x_cols + k_lo[:, None])  # (G/2, BM)
                x_hi = tl.load(x_cols + (k_lo + HALF)[:, None])
                z = tl.load(z_rows + g)  # (BN,)
                s = tl.load(s_rows + g)
            else:  # past g_end (the last step's tail) or past K (the last group's zero padding): read as 0
                in_g = (offs_n * 0 + g) < g_end  # (BN,)
                p = tl.load(w_rows + (g * HALF + offs_j)[None, :], mask=in_g[:, None], other=0)
                x_lo = tl.load(x_cols + k_lo[:, None], mask=(k_lo < k_end)[:, None], other=0.0)
                x_hi = tl.load(x_cols + (k_lo + HALF)[:, None], mask=(k_lo + HALF < k_end)[:, None], other=0.0)
                z = tl.load(z_rows + g, mask=in_g, other=0)
                s = tl.load(s_rows + g, mask=in_g, other=0.0)
            zf = (z.to(tl.float32) + MAGIC_VALUE).to(DOT_DTYPE)  # MAGIC_VALUE + zero, exact
            # code -> MAGIC_VALUE + code with one OR (the code lands in the mantissa), minus the same + zero: exact
            lo = ((p & 15).to(BITS_DTYPE) | MAGIC_BITS).to(DOT_DTYPE, bitcast=True) - zf[:, None]  # (BN, G/2)
            hi = ((p >> 4).to(BITS_DTYPE) | MAGIC_BITS).to(DOT_DTYPE, bitcast=True) - zf[:, None]
            if SCALE_TILE:  # (q - zero) * scale rounded to the dot's dtype, summed by the MMA across groups
                sd = s.to(DOT_DTYPE)[:, None]
                acc = tl.dot(lo * sd, x_lo.to(DOT_DTYPE), acc=acc, input_precision=DOT_PRECISION)
                acc = tl.dot(hi * sd, x_hi.to(DOT_DTYPE), acc=acc, input_precision=DOT_PRECISION)
            else:  # exact integer-valued operands; the group's fp32 scale once per output element
                part = tl.dot(lo, x_lo.to(DOT_DTYPE), input_precision=DOT_PRECISION)  # (BN, BM) fp32
                part = tl.dot(hi, x_hi.to(DOT_DTYPE), acc=part, input_precision=DOT_PRECISION)
                acc += part * s.to(tl.float32)[:, None]
    y_ptrs = y_ptr + tl.program_id(2) * stride_ys + offs_m[None, :] * stride_ym + offs_n[:, None]  # (BN, BM)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[None, :] & (offs_n < N)[:, None])


def _check_config(cfg: dict) -> None:
    """A clear error for block sizes the kernel cannot take (tl.dot needs every side >= 16)."""
    bn, bm, groups = cfg.get("BLOCK_N"), cfg.get("BLOCK_M", 16), cfg.get("GROUPS", 1)
    if not isinstance(bn, int) or bn < 16 or bn & (bn - 1):
        raise ValueError(f"small_m config: BLOCK_N must be a power of two >= 16 (tl.dot's M side), got {bn}")
    if bm not in SMALL_M_BLOCK_M:
        raise ValueError(f"small_m config: BLOCK_M must be one of {SMALL_M_BLOCK_M}, got {bm}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"small_m config: GROUPS must be a positive int, got {groups}")


def launch_int4_small_m(x, qweight, scales, zeros, group_size: int, cfg: dict, out, stride_ys: int, opts: dict):
    """Launch the swap-AB kernel on inputs :func:`kernels.quant_matmul.int4_matmul` has checked, into ``out``
    ((SPLIT_K, m, n), from its ``_outputs``). ``opts``: the launch's num_warps / num_stages."""
    _check_config(cfg)
    m, k = x.shape
    n, kp = qweight.shape[0], 2 * qweight.shape[1]
    split_k, groups = cfg.get("SPLIT_K", 1), cfg.get("GROUPS", 1)
    split_len = _split(kp // group_size, split_k, groups)
    dot_dtype, precision = _dot_types(x)
    bits, magic_bits, magic_value = _magic(dot_dtype, "int4")
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg.get("BLOCK_M", 16)), split_k)
    _int4_small_m_kernel[grid](x, qweight, scales, zeros, out, m, n, k, kp, x.stride(0), qweight.stride(0), n,
                               stride_ys, split_len, GROUP=group_size, BLOCK_N=cfg["BLOCK_N"],
                               BLOCK_M=cfg.get("BLOCK_M", 16), GROUPS=groups, STAGES=cfg.get("num_stages", 3),
                               SCALE_TILE=cfg.get("SCALE_TILE", False),
                               EVEN_K=k == kp and split_len * split_k == kp // group_size,
                               DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, BITS_DTYPE=bits,
                               MAGIC_BITS=magic_bits, MAGIC_VALUE=magic_value, **opts)


def int4_small_m_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int, *, config: dict | None = None) -> torch.Tensor:
    """:func:`kernels.quant_matmul.int4_matmul` on this kernel whatever m is: ``config`` overrides the block
    sizes of ``default_config("int4", 16, ...)`` (BLOCK_N, BLOCK_M, GROUPS, SCALE_TILE, SPLIT_K, warps, stages)."""
    n, kp = qweight.shape[0], 2 * qweight.shape[1]
    cfg = {**default_config("int4", 16, n, kp, group_size), **(config or {}), "path": "small_m"}
    return int4_matmul(x, qweight, scales, zeros, group_size, config=cfg)
