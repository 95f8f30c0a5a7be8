"""int8 weights, one scale per output row: the GEMV, WORDS GEMV and GEMM kernels, dequantised in registers.

Part of :mod:`kernels.quant_matmul`: its docstring has the overview and the tricks both families share (``MAGIC``,
pointer tensors of the weight tile's shape for x, ``SPLIT_K``), and it re-exports every name defined here.

Layout (written by :mod:`labkit.quant`, read here)::

    int8:  qweight [N, K]  int8, w[n, k] ~= qweight[n, k] * scales[n]            (per output channel)

Blocked algorithm (:mod:`kernels.quant_matmul_int4`'s without groups and zeros, the row scale applied at the end)::

    GEMV (m = 1, decode): one program per (BLOCK_N rows of W, row of x)
        acc[BLOCK_N, BLOCK_K] += q[n-block, k-block] * x[k-block]          # y = sum(acc) * scale
    GEMV, WORDS, int8 (fp16): int32 word i = weights 4i..4i+3, x64[i] = their inputs
        acc[BLOCK_N, BLOCK_K/4] += word_dot(w, x64[i])       # sum of q / 128 * x;  y = sum(acc) * 128 * scale
    GEMM (m > 1, tensor cores): one program per (BLOCK_M rows of x, BLOCK_N rows of W)
        acc[BLOCK_M, BLOCK_N] += x[m-block, k-block] @ q[n-block, k-block]^T   # y = acc * scale

Tricks, each a constexpr so the plain version stays next to it:
- ``WORDS`` for int8 (``_int8_gemv_words_kernel``): int4's idea for int8 weights. An int32 word is 4 weights
  and one int64 of x its 4 inputs; one PTX block a word (``_INT8_WORD_DOT_ASM``): XOR 0x80 on the word makes each
  byte q + 128 (1 LOP3 for 4 weights), PRMT puts two bytes under fp16's 0x64 exponent byte: 1024 + 128 + q exactly
  (1/2 a weight), one HFMA2 per pair turns that into q / 128 exactly (1/2), HMUL2 + HFMA2 multiply-add the pairs
  (1/2), two widenings and two FADDs: 11 instructions for 4 weights, ~2.9 a weight with the loads (against ~6 for
  the fp32 path). The fp16 bound: the word's products q / 128 * x are at most |x|, two of them summed per lane
  before widening, so fp16 overflows only for |x| > 32,000; the 1 / 128 costs precision only where |q x| / 128
  < 2**-14 (fp16 subnormals, absolute error 2**-25 * 128 * scale, far below the weight's own rounding). Without
  the 1 / 128 (HSUB2 1152 instead, as the int4 path), one product 127 * x overflows already for |x| > 516.
  bf16 / fp32 x keep the fp32 path (``_default_for``). Measured (H200, m = 1, data/bench/quant_matmul_words.json):
  1.62-1.63x fp16 cuBLAS, where the fp32 GEMV ran 1.36-1.50x (the bytes allow ~2x); it streams at ~3.1 TB/s
  beyond a ~6 us fixed cost a call (two shapes fitted), close to cuBLAS's own ~3.8 TB/s.
"""
from __future__ import annotations

import torch

import labkit.device  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import triton
import triton.language as tl

from kernels.quant_matmul_common import (INT8_GEMV_CONFIG, _FLOATS, _check_x, _default_for,  # noqa: F401
                                         _dot_types, _launch_options, _magic, _outputs)
from labkit.device import INTERPRETER


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _int8_gemv_loads(w_rows, x_row, mask_n, k0, k_end, K, BLOCK_K: tl.constexpr):
    """One step's loads: a [BLOCK_N, BLOCK_K] int8 tile and the inputs it multiplies (same shape)."""
    k = k0 + tl.arange(0, BLOCK_K)[None, :]  # (1, BK)
    valid = (k < K) & (k < k_end)
    q = tl.load(w_rows + k, mask=mask_n[:, None] & valid, other=0)  # (BN, BK) int8
    x = tl.load(x_row + k, mask=valid, other=0.0)  # (BN, BK): every row of the tile reads the same inputs
    return q, x


@triton.jit
def _int8_gemv_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32, unit stride along K
    w_ptr,  # [N, K] int8, row stride stride_wn
    s_ptr,  # [N] one scale per output row
    y_ptr,  # [M, N] x's dtype, or [SPLIT_K, M, N] fp32 partial sums
    M, N, K,
    stride_xm, stride_wn, stride_ym, stride_ys,
    SPLIT_STEPS,  # BLOCK_K-steps of k each split (program_id 2) covers
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    MAGIC: tl.constexpr,
    PREFETCH: tl.constexpr,  # issue the next step's loads before this step's arithmetic
):
    # One row m of x per program (program_id 1). x is loaded through a [BLOCK_N, BLOCK_K] pointer tensor
    # (every row of the tile points at the same inputs): a load of the weight's shape gets the weight's
    # register layout, so nothing has to be reshuffled through shared memory inside the loop.
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n[:, None] * stride_wn  # (BN, 1)
    x_row = x_ptr + m * stride_xm + offs_n[:, None] * 0  # (BN, 1), all the same row
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    k_start = tl.program_id(2) * SPLIT_STEPS * BLOCK_K  # a multiple of BLOCK_K: loads stay 16-byte aligned
    k_end = tl.minimum(k_start + SPLIT_STEPS * BLOCK_K, K)
    q, x = _int8_gemv_loads(w_rows, x_row, mask_n, k_start, k_end, K, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:  # the next tile is in flight while this one is multiplied
            q_next, x_next = _int8_gemv_loads(w_rows, x_row, mask_n, k0 + BLOCK_K, k_end, K, BLOCK_K)
        if MAGIC:  # (q + 128) as a byte, OR'ed into 2**23's mantissa: 2**23 + 128 + q exactly
            u = q.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80
            w = (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        else:
            w = q.to(tl.float32)
        acc += w * x.to(tl.float32)
        if PREFETCH:
            q, x = q_next, x_next
        else:
            q, x = _int8_gemv_loads(w_rows, x_row, mask_n, k0 + BLOCK_K, k_end, K, BLOCK_K)
    s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = tl.sum(acc, axis=1) * s  # (BN,)
    tl.store(y_ptr + tl.program_id(2) * stride_ys + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


# One int32 word of int8 weights (bytes b0..b3 = weights 4i..4i+3) and the four fp16 inputs they multiply (one
# int64 = two fp16 pairs) -> the fp32 sum of the word's four (q / 128) * x. XOR 0x80 turns each signed byte q into
# u = q + 128 (0..255); PRMT puts two bytes under fp16's 1024.0 (0x64 in each lane's high byte): 1024 + u, exact;
# one HFMA2 per pair computes (1024 + u) / 128 - 9 = q / 128, exact, so every product is at most |x| (the row's
# scale gets the 128 back at the end); HMUL2 + HFMA2 add the four products two lanes deep; two widenings and an
# FADD: 11 instructions for 4 weights, Triton's FADD into the accumulator included.
_INT8_WORD_DOT_ASM = tl.constexpr("""
{
.reg .b32 u, v0, v1, x0, x1, sc, off, a;
.reg .b16 h0, h1;
.reg .f32 f0, f1;
mov.b64 {x0, x1}, $2;
xor.b32 u, $1, 0x80808080;
prmt.b32 v0, u, 0x64646464, 0x4140;
prmt.b32 v1, u, 0x64646464, 0x4342;
mov.b32 sc, 0x20002000;
mov.b32 off, 0xC880C880;
fma.rn.f16x2 v0, v0, sc, off;
fma.rn.f16x2 v1, v1, sc, off;
mul.f16x2 a, v0, x0;
fma.rn.f16x2 a, v1, x1, a;
mov.b32 {h0, h1}, a;
cvt.f32.f16 f0, h0;
cvt.f32.f16 f1, h1;
add.f32 $0, f0, f1;
}
""")


@triton.jit
def _int8_words_loads(w_rows, i0, i_end, BLOCK_W: tl.constexpr, EVEN: tl.constexpr):
    """One step's weight loads: [BLOCK_N, BLOCK_W] int32 words, four int8 weights each. With EVEN every step is
    whole, so nothing is masked (a masked load costs a zeroing move per register)."""
    i = i0 + tl.arange(0, BLOCK_W)[None, :]  # (1, BW)
    if EVEN:
        return tl.load(w_rows + i)
    else:
        return tl.load(w_rows + i, mask=i < i_end, other=0)


@triton.jit
def _int8_words_dot(p, x_row, i0, i_end, BLOCK_W: tl.constexpr, USE_ASM: tl.constexpr, EVEN: tl.constexpr):
    """(BN, BW) fp32: for every word, the sum of its four (q / 128) * x (the row scale and the 128 come later)."""
    i = i0 + tl.arange(0, BLOCK_W)[None, :]  # (1, BW): word i multiplies x[4i .. 4i+3], which is x64[i]
    valid = i < i_end
    if USE_ASM:
        x64 = x_row.to(tl.pointer_type(tl.int64))
        if EVEN:  # (BN, BW): pointers of p's shape, so x gets p's register layout
            x = tl.load(x64 + i)
        else:
            x = tl.load(x64 + i, mask=valid, other=0)
        return tl.inline_asm_elementwise(_INT8_WORD_DOT_ASM, "=r,r,l", [p, x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:  # the same sums one byte at a time, in fp32 (the interpreter; bf16 and fp32 inputs)
        part = tl.zeros(p.shape, tl.float32)
        for b in tl.static_range(4):
            q = (p << (24 - 8 * b)) >> 24  # byte b, sign-extended by the arithmetic shift
            xb = tl.load(x_row + 4 * i + b, mask=valid, other=0.0)
            part += (q.to(tl.float32) * 0.0078125) * xb.to(tl.float32)
        return part


@triton.jit
def _int8_gemv_words_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32, unit stride along K (USE_ASM: fp16, rows 8-byte aligned)
    w_ptr,  # [N, K // 4] int32: the int8 weights read four at a time, row stride stride_wn (in words)
    s_ptr,  # [N] one scale per output row
    y_ptr,  # [M, N] x's dtype, or [SPLIT_K, M, N] fp32 partial sums
    M, N, K,
    stride_xm, stride_wn, stride_ym, stride_ys,
    SPLIT_STEPS,  # BLOCK_W-steps of words each split (program_id 2) covers
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,  # int32 words of a W row per step = 4 * BLOCK_W weights
    PREFETCH: tl.constexpr,  # issue the next step's weight loads before this step's arithmetic
    USE_ASM: tl.constexpr,  # fp16 x on the GPU: one inline-PTX block per word (_INT8_WORD_DOT_ASM)
    EVEN: tl.constexpr,  # every split holds whole steps: no load is masked
):
    # As _int8_gemv_kernel, but the tile is [BLOCK_N, BLOCK_W] int32 words. Rows past N read row N - 1 (in
    # bounds, never stored), so no load needs a row mask.
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rows = tl.minimum(offs_n, N - 1)
    w_rows = w_ptr + rows[:, None] * stride_wn  # (BN, 1)
    x_row = x_ptr + m * stride_xm + rows[:, None] * 0  # (BN, 1), all the same row of x
    num_words = K // 4
    i_start = tl.program_id(2) * SPLIT_STEPS * BLOCK_W
    i_end = tl.minimum(i_start + SPLIT_STEPS * BLOCK_W, num_words)
    acc = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
    p = _int8_words_loads(w_rows, i_start, i_end, BLOCK_W, EVEN)
    for i0 in range(i_start, i_end, BLOCK_W):
        i_next = tl.where(i0 + BLOCK_W < i_end, i0 + BLOCK_W, i_start)  # after the last step: wrap, stay in bounds
        if PREFETCH:  # the next tile is in flight while this one is unpacked and multiplied
            p_next = _int8_words_loads(w_rows, i_next, i_end, BLOCK_W, EVEN)
        acc += _int8_words_dot(p, x_row, i0, i_end, BLOCK_W, USE_ASM, EVEN)
        if PREFETCH:
            p = p_next
        else:
            p = _int8_words_loads(w_rows, i_next, i_end, BLOCK_W, EVEN)
    s = tl.load(s_ptr + rows).to(tl.float32) * 128.0  # the 128 the word dot divided by
    y = tl.sum(acc, axis=1) * s  # (BN,)
    tl.store(y_ptr + tl.program_id(2) * stride_ys + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty),
             mask=offs_n < N)


@triton.jit
def _int8_gemm_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32, unit stride along K
    w_ptr,  # [N, K] int8, row stride stride_wn
    s_ptr,  # [N]
    y_ptr,  # [M, N], or [SPLIT_K, M, N] fp32 partial sums
    M, N, K,
    stride_xm, stride_wn, stride_ym, stride_ys,
    SPLIT_STEPS,  # BLOCK_K-steps of k each split (program_id 2) covers
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BITS_DTYPE: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_VALUE: tl.constexpr,  # see _magic(); 0: plain cast
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    k_start = tl.program_id(2) * SPLIT_STEPS * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + SPLIT_STEPS * BLOCK_K, K), BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & (k < K)[None, :],
                    other=0.0)  # (BM, BK)
        q = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None], mask=mask_n[None, :] & (k < K)[:, None],
                    other=0)  # (BK, BN) int8: W^T's tile
        if MAGIC_BITS:  # q + 128 into the low mantissa bits of MAGIC_VALUE, then subtract: exact
            u = q.to(tl.uint8, bitcast=True).to(BITS_DTYPE) ^ 0x80
            w = (u | MAGIC_BITS).to(DOT_DTYPE, bitcast=True) - (MAGIC_VALUE + 128.0)
        else:
            w = q.to(DOT_DTYPE)
        acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
    s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = acc * s[None, :]
    tl.store(y_ptr + tl.program_id(2) * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :],
             y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- checks
def _check_int8(x, qweight, scales):
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(f"int8 qweight must be a 2-D int8 tensor (n, k), got {qweight.dtype} {tuple(qweight.shape)}")
    x = _check_x(x, qweight)
    n, k = qweight.shape
    if x.shape[1] != k:
        raise ValueError(f"x has k = {x.shape[1]} but qweight is (n, k) = {tuple(qweight.shape)}")
    if scales.shape != (n,) or scales.dtype not in _FLOATS or scales.device != qweight.device:
        raise ValueError(f"scales must be a float tensor of shape ({n},) on {qweight.device}, "
                         f"got {scales.dtype} {tuple(scales.shape)} on {scales.device}")
    return x, qweight.contiguous(), scales.contiguous()


# ----------------------------------------------------------------------------- wrappers
def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *, config: dict | None = None):
    """y = x @ (qweight * scales[:, None])^T. x (m, k) float; qweight (n, k) int8; scales (n,). Returns (m, n) in
    x's dtype.

    ``config`` overrides :func:`default_config`: ``path`` "gemv" or "gemm", that kernel's block sizes, and
    ``SPLIT_K`` (split k over that many programs; their fp32 partial sums are added by torch afterwards).
    ``WORDS=True`` (gemv) reads the weights as int32 words (k must be a multiple of 4), one PTX block a word for
    fp16 x on the GPU; fp32 maths otherwise.
    """
    x, qweight, scales = _check_int8(x, qweight, scales)
    m, k = x.shape
    n = qweight.shape[0]
    cfg = dict(config or _default_for("int8", x, n))
    split_k = cfg.get("SPLIT_K", 1)
    out, stride_ys = _outputs(x, n, split_k)
    opts = _launch_options(cfg)
    steps = triton.cdiv(triton.cdiv(k, cfg["BLOCK_K"]), split_k)  # BLOCK_K-steps per split
    if cfg["path"] == "gemv" and cfg.get("WORDS", False):  # int32 words, one PTX block a word on fp16 inputs
        _int8_words_launch(x, qweight, scales, out, stride_ys, cfg, opts)
    elif cfg["path"] == "gemv":  # one program per (BLOCK_N rows of W, row of x, split)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), m, split_k)
        _int8_gemv_kernel[grid](x, qweight, scales, out, m, n, k, x.stride(0), qweight.stride(0), n, stride_ys,
                                steps, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], MAGIC=cfg["MAGIC"],
                                PREFETCH=cfg.get("PREFETCH", True), **opts)
    else:
        dot_dtype, precision = _dot_types(x)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), split_k)
        bits, magic_bits, magic_value = _magic(dot_dtype, "int8")
        _int8_gemm_kernel[grid](x, qweight, scales, out, m, n, k, x.stride(0), qweight.stride(0), n, stride_ys,
                                steps, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                                DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, BITS_DTYPE=bits,
                                MAGIC_BITS=magic_bits, MAGIC_VALUE=magic_value, **opts)
    return out[0] if split_k == 1 else out.sum(0).to(x.dtype)


def _int8_words_launch(x, qweight, scales, out, stride_ys, cfg: dict, opts: dict) -> None:
    """Launch _int8_gemv_words_kernel: ``cfg["BLOCK_K"]`` weights (bytes) of a row per step, a power of two >= 4."""
    m, k = x.shape
    n = qweight.shape[0]
    block_k, split_k = cfg["BLOCK_K"], cfg.get("SPLIT_K", 1)
    if k % 4:
        raise ValueError(f"WORDS reads int8 rows as int32 words: k = {k} must be a multiple of 4 (use the gemv "
                         "path without WORDS)")
    if block_k < 4 or block_k & (block_k - 1):
        raise ValueError(f"WORDS needs BLOCK_K a power of two >= 4 (four weights a word), got {block_k}")
    use_asm = x.dtype == torch.float16 and not INTERPRETER
    if use_asm and (x.stride(0) % 4 or x.data_ptr() % 8):
        x = x.clone(memory_format=torch.contiguous_format)  # read as int64: rows must start 8-byte aligned
    if qweight.data_ptr() % 4:
        qweight = qweight.clone()
    words = qweight.view(torch.int32)  # (N, K // 4): four int8 weights a word
    block_w = block_k // 4
    steps = triton.cdiv(triton.cdiv(k // 4, block_w), split_k)  # BLOCK_W-steps per split
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), m, split_k)
    _int8_gemv_words_kernel[grid](x, words, scales, out, m, n, k, x.stride(0), words.stride(0), n, stride_ys, steps,
                                  BLOCK_N=cfg["BLOCK_N"], BLOCK_W=block_w, PREFETCH=cfg.get("PREFETCH", True),
                                  USE_ASM=use_asm, EVEN=steps * split_k * block_w == k // 4, **opts)


# ----------------------------------------------------------------------------- plain-torch references
def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(n, k) int8 codes times per-row scales -> (n, k) float."""
    return (qweight.float() * scales.float()[:, None]).to(dtype)


def int8_matmul_ref(x, qweight, scales, *, config=None):
    """Plain-torch :func:`int8_matmul` (dequantise, then an fp32 matmul). ``config`` is ignored."""
    x, qweight, scales = _check_int8(x, qweight, scales)
    return (x.float() @ dequantize_int8(qweight, scales).T).to(x.dtype)
