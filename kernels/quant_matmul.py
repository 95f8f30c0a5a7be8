"""Weight-only int8 / int4 matmul: the weights stay packed in memory and are dequantised in registers.

What you will learn
- Why batch-1 decode is a weight-streaming problem: every weight byte is read once per step, so
  4-bit weights can make a matmul up to ~4x faster than 16-bit ones (bytes, not FLOPs, set the time).
- How a kernel unpacks two 4-bit codes from a byte (mask, shift), subtracts the group's zero point,
  multiplies by its scale, and never writes the dequantised weight anywhere.
- Two shapes of the same computation: a GEMV path (few rows of x; CUDA-core multiply-adds, many
  programs along n so the whole chip streams the weight) and a GEMM path (``tl.dot`` on tensor cores).

Layouts (written by :mod:`labkit.quant`, read here; ``pack_int4`` / ``unpack_int4`` define int4's)::

    int8:  qweight [N, K]  int8, w[n, k] ~= qweight[n, k] * scales[n]            (per output channel)
    int4:  qweight [N, KP // 2] uint8, scales / zeros [N, KP // G]   (KP = K rounded up to G)
           w[n, k] ~= (q[n, k] - zeros[n, k // G]) * scales[n, k // G]          (per group of G along k)

    int4 packing inside one group of G weights (the same order as GGUF's Q4_0 / Q4_1 blocks):
        weights   w0 w1 ... w(G/2-1) | w(G/2) ... w(G-1)
        byte j  = [ code of w(j + G/2) | code of w(j) ]        high nibble | low nibble, j < G/2
    so the low nibbles of a group's G/2 bytes multiply x[g*G : g*G + G/2] and the high nibbles
    multiply x[g*G + G/2 : (g+1)*G]: two contiguous halves of x, no interleaving to undo.

Blocked algorithm (int4; int8 is the same without groups and zeros, its row scale applied at the end)::

    GEMV (m = 1, decode): one program per (BLOCK_N rows of W, row of x)
        acc[BLOCK_N, GROUPS] = 0
        for each run of GROUPS groups along k:                   # next run's loads issued first (PREFETCH)
            p          = packed[n-block, groups]                  # [BN, GROUPS, G/2] u8: the only read of W
            x_lo, x_hi = x[groups' first / second halves]         # loaded with p's shape, hence its layout
            acc       += sum_j((p & 15) - zero) * x_lo + ((p >> 4) - zero) * x_hi) * scale
        y = sum over GROUPS of acc
    GEMV, WORDS (fp16): the same loop over int32 words w = bytes 4i..4i+3 of a group
        acc[BLOCK_N, GROUPS, G/8] += word_dot(w, x[4i..4i+3], x[G/2+4i..G/2+4i+3], zero) * scale
    GEMV, WORDS, int8 (fp16): int32 word i = weights 4i..4i+3, x64[i] = their inputs
        acc[BLOCK_N, BLOCK_K/4] += word_dot(w, x64[i])       # sum of q / 128 * x;  y = sum(acc) * 128 * scale
    GEMM (m > 1, tensor cores): one program per (BLOCK_M rows of x, BLOCK_N rows of W)
        for each group g:  acc += (x_lo @ ((p & 15) - zero) + x_hi @ ((p >> 4) - zero)) * scale[g]

Tricks, each a constexpr so the plain version stays next to it:
- ``MAGIC``: ``0x4B000000 | q`` read as fp32 is exactly 2**23 + q, so one OR and one subtract replace
  an int-to-float conversion (which runs at a quarter of the rate of adds). The GEMM path does the same
  in 16 bits (0x6400 | q is 1024 + q in fp16).
- Pointer tensors of the weight tile's shape for x (every row of the tile points at the same inputs):
  Triton gives loads of one shape one register layout, so the loop never reshuffles x through shared
  memory (an earlier version did, three times a step).
- ``HALF_MATH`` (fp16 x, GEMV): dequantise and multiply in fp16 pairs, with the nibbles unpacked by
  inline PTX (``_INT4_TO_FP16_ASM``): 6.3 instead of 8.9 SASS instructions per weight in the loop
  (G = 32, compiled for sm_90 by Triton 3.9). Products are rounded to fp16 and overflow if |x| > ~2000.
  Off by default: WORDS below does the same pairs in a third fewer instructions.
- ``WORDS`` (int4 GEMV, ``_int4_gemv_words_kernel``): the packed bytes read as int32 words, 8 weights
  each, and fp16 x read as int64 (4 inputs each), so one inline-PTX block (``_INT4_WORD_DOT_ASM``) takes
  a word and the 8 inputs it multiplies and returns their fp32 dot product. Inside: PRMT + LOP3 unpack
  two codes into an fp16 pair 1024 + q (1 instruction a weight), HADD2 subtracts (1024 + zero) exactly
  (1/2), HMUL2 / HFMA2 multiply-add pairs four deep (1/2), then two fp16 -> fp32 widenings and an FADD;
  Triton adds one FFMA for the group's scale. Rows past n are clamped rather than masked and whole steps
  need no group mask, because every masked load also costs a zeroing move. 3.0-3.2 SASS instructions a
  weight in the loop (G = 32, BLOCK_N = 4, 16 or 8 words a thread; sm_90, Triton 3.9) against 8.9 for
  the fp32 path and 6.3 for HALF_MATH. fp16 sums of 8 products: rel. error ~3e-4; x must stay below
  ~1000. Measured on an H200 at m = 1: 1.8-2.0x fp16 cuBLAS (was 1.35x), ~1.5 TB/s: no longer bound by
  instructions alone, so the next steps are more bytes in flight per SM, not fewer instructions.
- ``PREFETCH = 2`` (WORDS): two steps of weight loads in flight, not one: each program keeps twice the bytes
  outstanding (Little's law: bandwidth = bytes in flight / latency), for one more tile of registers. ``STAGES``
  instead hands the loop to ``tl.range(num_stages=...)``, whose pipeliner stages the loads itself (PREFETCH = 0).
- int4 at 2 <= m <= 16 (``path="small_m"``, the default there): the GEMM with A and B swapped, so the weight
  tile is the tensor core's big side; its own lesson is in :mod:`kernels.quant_matmul_small_m`.
  Measured (H200, data/bench/quant_matmul_words.json): PREFETCH = 2 bought nothing at m = 1 (1.74-2.01x fp16
  cuBLAS against one step's 1.84-2.00x) and STAGES lost (0.52-0.72x; not profiled: its SASS was not
  recorded); swap-AB won only on the long-k down projection (4096 x 14336, m = 4 and 16), so the default takes
  it only where k >= 2n.
- ``WORDS`` for int8 (``_int8_gemv_words_kernel``): the same idea for int8 weights. An int32 word is 4 weights
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
- ``SPLIT_K``: more programs along k, whose fp32 partial sums torch adds afterwards (an extra launch).
"""
from __future__ import annotations

import torch

import labkit.device  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import triton
import triton.language as tl

from labkit.device import INTERPRETER

SUPPORTED_GROUPS = (32, 64, 128, 256)
GEMV_MAX_M = 1  # up to this many rows of x the GEMV path is the default (measured: m = 4 already favours tl.dot)
SMALL_M_MAX = 16  # int4, GEMV_MAX_M < m <= this: the swap-AB kernel of kernels/quant_matmul_small_m.py
# int8's fp32 GEMV as the sweep in data/bench/quant_matmul.json picked it: the fallback where WORDS does not apply
INT8_GEMV_CONFIG = dict(path="gemv", BLOCK_N=4, BLOCK_K=512, MAGIC=True, PREFETCH=True, num_warps=4)


# ----------------------------------------------------------------------------- int4 packing (the layout)
def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pack 4-bit codes (N, K) with values 0..15 into (N, K // 2) uint8, in the group layout above."""
    if q.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D (N, K) tensor of codes, got shape {tuple(q.shape)}")
    if q.is_floating_point() or q.is_complex():
        raise ValueError(f"pack_int4 expects integer codes 0..15, got {q.dtype}")
    n, k = q.shape
    if group_size % 2 or k % group_size:
        raise ValueError(f"K = {k} must be a multiple of the (even) group size {group_size}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_int4 expects codes in 0..15")
    g = q.to(torch.uint8).reshape(n, k // group_size, 2, group_size // 2)  # (N, groups, half, G/2)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: (N, K // 2) uint8 -> (N, K) uint8 codes 0..15."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_int4 expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    n, kb = packed.shape
    if (2 * kb) % group_size:
        raise ValueError(f"{2 * kb} codes a row is not a multiple of the group size {group_size}")
    g = packed.reshape(n, 2 * kb // group_size, 1, group_size // 2)  # (N, groups, 1, G/2)
    return torch.cat([g & 15, g >> 4], dim=2).reshape(n, 2 * kb)  # low nibbles first, then high


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


# Four packed bytes [b3 b2 b1 b0] -> eight fp16 values 1024 + code, as pairs in 32-bit registers: PRMT moves
# two bytes into the two 16-bit lanes, LOP3 keeps one nibble of each and ORs in fp16's 1024.0 (0x6400),
# so the code lands in the mantissa (the classic "lop3" trick of FasterTransformer / Marlin).
_INT4_TO_FP16_ASM = tl.constexpr("""
{
.reg .b32 t0, t1;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 $0, t0, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $1, t1, 0x000F000F, 0x64006400, 0xEA;
shr.b32 t0, t0, 4;
shr.b32 t1, t1, 4;
lop3.b32 $2, t0, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 $3, t1, 0x000F000F, 0x64006400, 0xEA;
}
""")


@triton.jit
def _int4_gemv_loads(w_rows, x_row, s_rows, z_rows, mask_n, g0, g_end, K,
                     GROUP: tl.constexpr, GROUPS: tl.constexpr, EVEN_K: tl.constexpr):
    """One step's loads: packed bytes [BLOCK_N, GROUPS, G/2], the inputs of their low and high nibbles
    (same shape), and the groups' scales and zero points [BLOCK_N, GROUPS]."""
    HALF: tl.constexpr = GROUP // 2
    g = g0 + tl.arange(0, GROUPS)  # (NG,)
    offs_j = tl.arange(0, HALF)
    mask_ng = mask_n[:, None] & (g < g_end)[None, :]  # (BN, NG)
    # Masked-off lanes (rows past N, the step after the last) are left undefined: they are never stored.
    p = tl.load(w_rows + (g * HALF)[None, :, None] + offs_j[None, None, :], mask=mask_ng[:, :, None])
    k_lo = (g * GROUP)[None, :, None] + offs_j[None, None, :]  # (1, NG, G/2): inputs of the low nibbles
    valid = (g < g_end)[None, :, None]
    if EVEN_K:
        x_lo = tl.load(x_row + k_lo, mask=valid)  # (BN, NG, G/2)
        x_hi = tl.load(x_row + k_lo + HALF, mask=valid)
    else:  # inputs past K (the zero padding of the last group) must read as 0
        x_lo = tl.load(x_row + k_lo, mask=valid & (k_lo < K), other=0.0)
        x_hi = tl.load(x_row + k_lo + HALF, mask=valid & (k_lo + HALF < K), other=0.0)
    s = tl.load(s_rows + g[None, :], mask=mask_ng)
    z = tl.load(z_rows + g[None, :], mask=mask_ng)
    return p, x_lo, x_hi, s, z


@triton.jit
def _int4_gemv_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32, unit stride along K
    w_ptr,  # [N, KP // 2] uint8, two codes a byte (group layout in the module docstring), row stride stride_wn
    s_ptr,  # [N, KP // GROUP] scales
    z_ptr,  # [N, KP // GROUP] uint8 zero points 0..15
    y_ptr,  # [M, N] x's dtype, or [SPLIT_K, M, N] fp32 partial sums
    M, N, K, KP,
    stride_xm, stride_wn, stride_ym, stride_ys,
    SPLIT_LEN,  # groups each split (program_id 2) covers, a multiple of GROUPS
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr,  # groups per row and step: BLOCK_K = GROUPS * GROUP weights
    MAGIC: tl.constexpr,
    PREFETCH: tl.constexpr,  # issue the next step's loads before this step's arithmetic
    HALF_MATH: tl.constexpr = False,  # fp16 x only: dequantise and multiply in fp16 pairs, sum in fp32
    USE_ASM: tl.constexpr = False,  # HALF_MATH's unpacking as inline PTX (GPU only)
    EVEN_K: tl.constexpr = False,  # K == KP: no zero padding to mask
):
    # One row m of x per program (program_id 1); the tile is [BLOCK_N, GROUPS, G/2] packed bytes, and the
    # inputs are loaded through pointer tensors of that same shape, so the loads share one register layout.
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    mask_n = offs_n < N
    num_groups = KP // GROUP
    w_rows = w_ptr + offs_n[:, None, None] * stride_wn  # (BN, 1, 1)
    x_row = x_ptr + m * stride_xm + offs_n[:, None, None] * 0  # (BN, 1, 1), all the same row of x
    s_rows = s_ptr + offs_n[:, None] * num_groups  # (BN, 1)
    z_rows = z_ptr + offs_n[:, None] * num_groups
    acc = tl.zeros((BLOCK_N, GROUPS), tl.float32)
    g_start = tl.program_id(2) * SPLIT_LEN
    g_end = tl.minimum(g_start + SPLIT_LEN, num_groups)
    p, x_lo, x_hi, s, z = _int4_gemv_loads(w_rows, x_row, s_rows, z_rows, mask_n, g_start, g_end, K, GROUP, GROUPS,
                                           EVEN_K)
    for g0 in range(g_start, g_end, GROUPS):
        if PREFETCH:  # the next tile is in flight while this one is unpacked and multiplied
            p_n, x_lo_n, x_hi_n, s_n, z_n = _int4_gemv_loads(w_rows, x_row, s_rows, z_rows, mask_n, g0 + GROUPS,
                                                            g_end, K, GROUP, GROUPS, EVEN_K)
        if HALF_MATH:  # fp16 pairs: (1024 + q) - (1024 + zero) exact, two products per byte, summed in fp32
            zh = (z.to(tl.float32) + 1024.0).to(tl.float16)
            if USE_ASM:  # four bytes -> eight fp16 codes in four registers: 2 PRMT + 2 SHR + 4 LOP3
                lo, hi = tl.inline_asm_elementwise(_INT4_TO_FP16_ASM, "=r,=r,=r,=r,r", [p],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
            else:  # the same values, one element at a time (the interpreter cannot run PTX)
                lo = ((p & 15).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
                hi = ((p >> 4).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)
            t = (lo - zh[:, :, None]) * x_lo + (hi - zh[:, :, None]) * x_hi  # fp16: one value per byte
            part = tl.sum(t.to(tl.float32), axis=2)  # (BN, NG)
        else:
            zf = z.to(tl.float32)
            if MAGIC:
                lo = ((p & 15).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)  # 2**23 + q
                hi = ((p >> 4).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True)
                zf = zf + 8388608.0
            else:
                lo = (p & 15).to(tl.float32)
                hi = (p >> 4).to(tl.float32)
            # sum over the group of (q - zero) * x, then one multiply by the group's scale
            part = tl.sum((lo - zf[:, :, None]) * x_lo.to(tl.float32) + (hi - zf[:, :, None]) * x_hi.to(tl.float32),
                          axis=2)  # (BN, NG)
        acc += part * s.to(tl.float32)
        if PREFETCH:
            p, x_lo, x_hi, s, z = p_n, x_lo_n, x_hi_n, s_n, z_n
        else:
            p, x_lo, x_hi, s, z = _int4_gemv_loads(w_rows, x_row, s_rows, z_rows, mask_n, g0 + GROUPS, g_end, K,
                                                   GROUP, GROUPS, EVEN_K)
    y = tl.sum(acc, axis=1)  # (BN,)
    tl.store(y_ptr + tl.program_id(2) * stride_ys + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


# One packed int32 word of a group (bytes b0..b3: codes 4i..4i+3 in the low nibbles, G/2 + 4i.. in the high
# ones), the eight fp16 inputs they multiply (two int64 = four fp16 pairs) and (1024 + zero) in both halves of
# $4 -> the fp32 sum of the word's eight (q - zero) * x. Unpacking is _INT4_TO_FP16_ASM's PRMT + LOP3 (one
# instruction a weight); the zero is subtracted exactly in fp16 pairs (HADD2, half an instruction a weight);
# the products are summed two at a time (HMUL2 / HFMA2, half an instruction a weight), four deep, then the
# two halves are widened to fp32 and added: 20 instructions for 8 weights, the scale's FFMA included.
_INT4_WORD_DOT_ASM = tl.constexpr("""
{
.reg .b32 t0, t1, q0, q1, q2, q3, x0, x1, x2, x3, a;
.reg .b16 h0, h1;
.reg .f32 f0, f1;
mov.b64 {x0, x1}, $2;
mov.b64 {x2, x3}, $3;
prmt.b32 t0, $1, 0, 0x4140;
prmt.b32 t1, $1, 0, 0x4342;
lop3.b32 q0, t0, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 q1, t1, 0x000F000F, 0x64006400, 0xEA;
shr.b32 t0, t0, 4;
shr.b32 t1, t1, 4;
lop3.b32 q2, t0, 0x000F000F, 0x64006400, 0xEA;
lop3.b32 q3, t1, 0x000F000F, 0x64006400, 0xEA;
sub.f16x2 q0, q0, $4;
sub.f16x2 q1, q1, $4;
sub.f16x2 q2, q2, $4;
sub.f16x2 q3, q3, $4;
mul.f16x2 a, q0, x0;
fma.rn.f16x2 a, q1, x1, a;
fma.rn.f16x2 a, q2, x2, a;
fma.rn.f16x2 a, q3, x3, a;
mov.b32 {h0, h1}, a;
cvt.f32.f16 f0, h0;
cvt.f32.f16 f1, h1;
add.f32 $0, f0, f1;
}
""")


@triton.jit
def _int4_words_loads(w_rows, s_rows, z_rows, g0, g_end, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                      EVEN_G: tl.constexpr):
    """One step's weight loads: packed words [BLOCK_N, GROUPS, G/8] int32, scales and zeros [BLOCK_N, GROUPS].
    With EVEN_G every step is whole, so nothing is masked (masked loads cost a zeroing move each)."""
    WPG: tl.constexpr = GROUP // 8  # int32 words a group
    g = g0 + tl.arange(0, GROUPS)  # (NG,)
    w_ptrs = w_rows + (g * WPG)[None, :, None] + tl.arange(0, WPG)[None, None, :]  # (BN, NG, WPG)
    if EVEN_G:
        return tl.load(w_ptrs), tl.load(s_rows + g[None, :]), tl.load(z_rows + g[None, :])
    else:
        mask_g = (g < g_end)[None, :]  # (1, NG)
        return (tl.load(w_ptrs, mask=mask_g[:, :, None]), tl.load(s_rows + g[None, :], mask=mask_g),
                tl.load(z_rows + g[None, :], mask=mask_g))


@triton.jit
def _int4_words_dot(p, z, x_row, g0, g_end, K, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                    USE_ASM: tl.constexpr, EVEN_K: tl.constexpr, EVEN_G: tl.constexpr):
    """(BN, NG, G/8) fp32: for every packed word, the sum of its eight (q - zero) * x (not yet scaled)."""
    WPG: tl.constexpr = GROUP // 8
    g = g0 + tl.arange(0, GROUPS)
    i = tl.arange(0, WPG)
    valid = (g < g_end)[None, :, None]  # (1, NG, 1)
    if USE_ASM:  # x as int64, four fp16 inputs each: word i of group g needs x64[g*G/4 + i] and x64[g*G/4 + G/8 + i]
        x64 = x_row.to(tl.pointer_type(tl.int64))
        idx = (g * (GROUP // 4))[None, :, None] + i[None, None, :]  # (1, NG, WPG)
        if EVEN_G:  # (BN, NG, WPG): the pointers have p's shape, so x gets p's layout
            x_lo, x_hi = tl.load(x64 + idx), tl.load(x64 + idx + WPG)
        else:
            x_lo, x_hi = tl.load(x64 + idx, mask=valid), tl.load(x64 + idx + WPG, mask=valid)
        zz = (z.to(tl.int32) | 0x6400) * 0x10001  # fp16 pair (1024 + zero, 1024 + zero)
        return tl.inline_asm_elementwise(_INT4_WORD_DOT_ASM, "=r,r,l,l,r", [p, x_lo, x_hi, zz[:, :, None]],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:  # the same sums one nibble at a time, in fp32 (the interpreter; bf16 and fp32 inputs)
        zf = z.to(tl.float32)[:, :, None]
        k_lo = (g * GROUP)[None, :, None] + 4 * i[None, None, :]  # (1, NG, WPG): input of byte 0's low nibble
        part = tl.zeros(p.shape, tl.float32)
        for b in tl.static_range(4):  # byte b of the word: codes 4i + b (low nibble) and G/2 + 4i + b (high)
            lo = ((p >> (8 * b)) & 15).to(tl.float32)
            hi = ((p >> (8 * b + 4)) & 15).to(tl.float32)
            if EVEN_K:
                x_lo = tl.load(x_row + k_lo + b, mask=valid)
                x_hi = tl.load(x_row + k_lo + GROUP // 2 + b, mask=valid)
            else:  # inputs past K (the zero padding of the last group) must read as 0
                x_lo = tl.load(x_row + k_lo + b, mask=valid & (k_lo + b < K), other=0.0)
                x_hi = tl.load(x_row + k_lo + GROUP // 2 + b, mask=valid & (k_lo + GROUP // 2 + b < K), other=0.0)
            part += (lo - zf) * x_lo.to(tl.float32) + (hi - zf) * x_hi.to(tl.float32)
        return part


@triton.jit
def _int4_gemv_words_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32, unit stride along K (USE_ASM: fp16, K == KP, rows 8-byte aligned)
    w_ptr,  # [N, KP // 8] int32: the packed bytes of the layout above, read four at a time, row stride stride_wn
    s_ptr,  # [N, KP // GROUP] scales
    z_ptr,  # [N, KP // GROUP] uint8 zero points 0..15
    y_ptr,  # [M, N] x's dtype, or [SPLIT_K, M, N] fp32 partial sums
    M, N, K, KP,
    stride_xm, stride_wn, stride_ym, stride_ys,
    SPLIT_LEN,  # groups each split (program_id 2) covers, a multiple of GROUPS
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr,  # groups per row and step
    PREFETCH: tl.constexpr,  # 1 / True: the next step's weight loads issued before this step's arithmetic; 2: two
    USE_ASM: tl.constexpr,  # fp16 x on the GPU: one inline-PTX block per word (_INT4_WORD_DOT_ASM)
    EVEN_K: tl.constexpr = False,  # K == KP: no zero padding to mask
    EVEN_G: tl.constexpr = False,  # every split holds a whole number of steps: no loads masked
    STAGES: tl.constexpr = None,  # tl.range's software pipelining depth (with PREFETCH = 0: Triton's own prefetch)
):
    # As _int4_gemv_kernel, but the tile is [BLOCK_N, GROUPS, G/8] int32 words, each word 8 weights. Rows past
    # N read row N - 1 (in bounds, never stored), so no load needs a row mask.
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rows = tl.minimum(offs_n, N - 1)
    num_groups = KP // GROUP
    w_rows = w_ptr + rows[:, None, None] * stride_wn  # (BN, 1, 1)
    x_row = x_ptr + m * stride_xm + rows[:, None, None] * 0  # (BN, 1, 1), all the same row of x
    s_rows = s_ptr + rows[:, None] * num_groups  # (BN, 1)
    z_rows = z_ptr + rows[:, None] * num_groups
    acc = tl.zeros((BLOCK_N, GROUPS, GROUP // 8), tl.float32)
    g_start = tl.program_id(2) * SPLIT_LEN
    g_end = tl.minimum(g_start + SPLIT_LEN, num_groups)
    if PREFETCH:
        p, s, z = _int4_words_loads(w_rows, s_rows, z_rows, g_start, g_end, GROUP, GROUPS, EVEN_G)
    if PREFETCH == 2:  # the second step in flight before the loop starts (wrapping round as below)
        g_1 = tl.where(g_start + GROUPS < g_end, g_start + GROUPS, g_start)
        p_1, s_1, z_1 = _int4_words_loads(w_rows, s_rows, z_rows, g_1, g_end, GROUP, GROUPS, EVEN_G)
    for g0 in tl.range(g_start, g_end, GROUPS, num_stages=STAGES):
        if PREFETCH == 2:  # two steps ahead: twice the bytes in flight per program, one more tile of registers
            g_next = tl.where(g0 + 2 * GROUPS < g_end, g0 + 2 * GROUPS, g_start)
            p_n, s_n, z_n = _int4_words_loads(w_rows, s_rows, z_rows, g_next, g_end, GROUP, GROUPS, EVEN_G)
        elif PREFETCH:  # the step after the last wraps round to the first (unmasked loads stay in bounds)
            g_next = tl.where(g0 + GROUPS < g_end, g0 + GROUPS, g_start)
            p_n, s_n, z_n = _int4_words_loads(w_rows, s_rows, z_rows, g_next, g_end, GROUP, GROUPS, EVEN_G)
        else:  # this step's loads in this step: the plain loop, which tl.range(num_stages=STAGES) may pipeline itself
            p, s, z = _int4_words_loads(w_rows, s_rows, z_rows, g0, g_end, GROUP, GROUPS, EVEN_G)
        part = _int4_words_dot(p, z, x_row, g0, g_end, K, GROUP, GROUPS, USE_ASM, EVEN_K, EVEN_G)
        acc += part * s.to(tl.float32)[:, :, None]  # the group's scale, once per word
        if PREFETCH == 2:
            p, s, z = p_1, s_1, z_1
            p_1, s_1, z_1 = p_n, s_n, z_n
        elif PREFETCH:
            p, s, z = p_n, s_n, z_n
    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BN,)
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


@triton.jit
def _int4_gemm_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32, unit stride along K
    w_ptr,  # [N, KP // 2] uint8, row stride stride_wn
    s_ptr,  # [N, KP // GROUP]
    z_ptr,  # [N, KP // GROUP] uint8
    y_ptr,  # [M, N], or [SPLIT_K, M, N] fp32 partial sums
    M, N, K, KP,
    stride_xm, stride_wn, stride_ym, stride_ys,
    SPLIT_LEN,  # groups each split (program_id 2) covers, a multiple of GROUPS
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr,  # groups per loop step (unrolled), so each step loads a bigger tile
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BITS_DTYPE: tl.constexpr, MAGIC_BITS: tl.constexpr, MAGIC_VALUE: tl.constexpr,  # see _magic()
):
    HALF: tl.constexpr = GROUP // 2
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, HALF)
    mask_m, mask_n = offs_m < M, offs_n < N
    num_groups = KP // GROUP
    g_start = tl.program_id(2) * SPLIT_LEN
    g_end = tl.minimum(g_start + SPLIT_LEN, num_groups)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    k_end = tl.minimum(K, g_end * GROUP)  # inputs this split may read
    for g0 in range(g_start, g_end, GROUPS):
        for gi in tl.static_range(GROUPS):
            g = g0 + gi  # past g_end (the last step's tail) every load below is masked off
            k_lo = g * GROUP + offs_j  # (G/2,)
            x_lo = tl.load(x_ptr + offs_m[:, None] * stride_xm + k_lo[None, :],
                           mask=mask_m[:, None] & (k_lo < k_end)[None, :], other=0.0)  # (BM, G/2)
            x_hi = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k_lo + HALF)[None, :],
                           mask=mask_m[:, None] & (k_lo + HALF < k_end)[None, :], other=0.0)
            p = tl.load(w_ptr + offs_n[None, :] * stride_wn + (g * HALF + offs_j)[:, None],
                        mask=mask_n[None, :] & (g * HALF + offs_j < g_end * HALF)[:, None],
                        other=0)  # (G/2, BN) uint8: W^T's tile, packed
            mask_g = mask_n & (offs_n * 0 + g < g_end)
            z = tl.load(z_ptr + offs_n * num_groups + g, mask=mask_g, other=0)  # (BN,)
            s = tl.load(s_ptr + offs_n * num_groups + g, mask=mask_g, other=0.0).to(tl.float32)
            zf = (z.to(tl.float32) + MAGIC_VALUE).to(DOT_DTYPE)  # MAGIC_VALUE + zero, exact
            # code -> MAGIC_VALUE + code with one OR (the code lands in the mantissa), minus the same + zero
            lo = ((p & 15).to(BITS_DTYPE) | MAGIC_BITS).to(DOT_DTYPE, bitcast=True) - zf[None, :]
            hi = ((p >> 4).to(BITS_DTYPE) | MAGIC_BITS).to(DOT_DTYPE, bitcast=True) - zf[None, :]
            part = tl.dot(x_lo.to(DOT_DTYPE), lo, input_precision=DOT_PRECISION)
            part = tl.dot(x_hi.to(DOT_DTYPE), hi, acc=part, input_precision=DOT_PRECISION)
            acc += part * s[None, :]  # the group's scale, once per output element
    tl.store(y_ptr + tl.program_id(2) * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- checks and configs
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _check_x(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (m, k), got shape {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"x is on {x.device} but the quantised weight is on {like.device}: move one of them")
    return x if x.stride(1) == 1 else x.contiguous()


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


def _check_int4(x, qweight, scales, zeros, group_size):
    if group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUPS}, got {group_size}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"int4 qweight must be 2-D uint8 (n, k_padded // 2), got {qweight.dtype} {tuple(qweight.shape)}")
    x = _check_x(x, qweight)
    n, kp = qweight.shape[0], 2 * qweight.shape[1]
    k = x.shape[1]
    if kp % group_size or not kp - group_size < k <= kp:
        raise ValueError(f"x has k = {k} but qweight holds {kp} codes a row: expected k rounded up to a multiple "
                         f"of group_size {group_size} to equal {kp}")
    want = (n, kp // group_size)
    if scales.shape != want or scales.dtype not in _FLOATS or scales.device != qweight.device:
        raise ValueError(f"scales must be float {want} on {qweight.device}, got {scales.dtype} {tuple(scales.shape)} "
                         f"on {scales.device}")
    if zeros.shape != want or zeros.dtype != torch.uint8 or zeros.device != qweight.device:
        raise ValueError(f"zeros must be uint8 {want} on {qweight.device}, got {zeros.dtype} {tuple(zeros.shape)} "
                         f"on {zeros.device}")
    return x, qweight.contiguous(), scales.contiguous(), zeros.contiguous()


def default_config(kind: str, m: int, n: int, k: int, group_size: int | None = None) -> dict:
    """Block sizes for an H100/H200: the winners of the sweep in data/bench/quant_matmul.json.

    m = 1 (decode): the GEMV path, 4 rows of W per program, so n / 4 programs (>= 1024 for Llama's shapes)
    keep enough loads in flight; int4 reads 1 KB of each row per step as int32 words (``WORDS``). m > 1: tensor cores; a
    BLOCK_N of 32 keeps n / 32 programs busy, and int4 steps two groups at a time. int4 at 2 <= m <= 16: the
    swap-AB kernel (``path="small_m"``), 64 rows of W per program, k split for short n, where k >= 2n (the
    shape it won in the recorded sweep; the GEMM was as fast or faster on the other two).
    """
    if m <= GEMV_MAX_M:
        if kind == "int8":  # int32 words (WORDS), fp16 x only (see _default_for): the sweep's winner on all 3 shapes
            return dict(path="gemv", WORDS=True, BLOCK_N=4, BLOCK_K=1024, PREFETCH=True, num_warps=4)
        # int32 words and one PTX block a word (WORDS): its fast path needs fp16 x, see _default_for
        return dict(path="gemv", WORDS=True, BLOCK_N=4, GROUPS=max(1, 2048 // group_size), PREFETCH=True,
                    num_warps=4)
    # swap-AB where it won the recorded sweep (data/bench/quant_matmul_words.json, H200): the long-k, short-n down
    # projection (4096 x 14336: 38 against the GEMM's 44-45 us at m = 4 and 16); the GEMM kept the other two shapes
    if kind == "int4" and m <= SMALL_M_MAX and k >= 2 * n:  # 64 rows of W per MMA; k split to ~2 programs per SM
        split_k = max(1, min(4, 256 // triton.cdiv(n, 64), k // 1024))
        cfg = dict(path="small_m", BLOCK_N=64, BLOCK_M=16, GROUPS=max(1, 256 // group_size), num_warps=4,
                   num_stages=3)
        return cfg if split_k == 1 else {**cfg, "SPLIT_K": split_k}
    block_m = 16 if m <= 16 else 64
    if kind == "int8":
        return dict(path="gemm", BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=4)
    return dict(path="gemm", BLOCK_M=block_m, BLOCK_N=32, GROUPS=2, num_warps=4, num_stages=4)


def _dot_types(x: torch.Tensor):
    if INTERPRETER:  # the interpreter's dot runs in numpy; fp32 avoids its raw-bits bf16
        return tl.float32, "ieee"
    return _TL[x.dtype], ("ieee" if x.dtype == torch.float32 else "tf32")


def _magic(dot_dtype, kind: str):
    """(integer type, bits, value) such that ``(code | bits)`` read as ``dot_dtype`` is ``value + code`` exactly:
    0x6400 is 1024.0 in fp16 (10 mantissa bits hold codes up to 1023), 0x4300 is 128.0 in bf16 (7 bits:
    enough for int4 codes, not for int8's 0..255, which then use a plain conversion), 0x4B000000 is 2**23 in fp32."""
    if dot_dtype == tl.float16:
        return tl.int16, 0x6400, 1024.0
    if dot_dtype == tl.bfloat16:
        return (tl.int16, 0x4300, 128.0) if kind == "int4" else (tl.int16, 0, 0.0)
    return tl.int32, 0x4B000000, 8388608.0


def _default_for(kind: str, x: torch.Tensor, n: int, group_size: int | None = None) -> dict:
    """default_config, with fp32 inputs given fewer pipeline stages: their tiles are twice the bytes of
    fp16 ones, and four stages of int8's GEMM tile overflow shared memory (253,952 of 232,448 bytes on an H200)."""
    m, k = x.shape
    cfg = default_config(kind, m, n, k, group_size)
    if kind == "int8" and cfg.get("WORDS") and (x.dtype != torch.float16 or k % 4):  # words need fp16 x, k % 4 == 0
        cfg = dict(INT8_GEMV_CONFIG)
    if kind == "int4" and cfg.get("WORDS") and x.dtype != torch.float16:  # fp16 pairs; bf16 / fp32: fp32 maths
        cfg = dict(path="gemv", BLOCK_N=4, GROUPS=max(1, 512 // group_size), MAGIC=True, PREFETCH=True, num_warps=2)
    if x.dtype == torch.float32 and cfg["path"] in ("gemm", "small_m"):
        cfg["num_stages"] = min(cfg.get("num_stages", 2), 2)
    return cfg


def _launch_options(cfg: dict) -> dict:
    return {key: cfg[key] for key in ("num_warps", "num_stages") if key in cfg and not INTERPRETER}


# ----------------------------------------------------------------------------- wrappers
def _split(total: int, split_k: int, unit: int) -> int:
    """Length (a multiple of ``unit``) of each of ``split_k`` ranges that together cover ``total``."""
    return triton.cdiv(triton.cdiv(total, split_k), unit) * unit


def _outputs(x: torch.Tensor, n: int, split_k: int):
    """(buffer the kernel writes, its split stride): y itself, or fp32 partial sums that are added afterwards."""
    m = x.shape[0]
    if split_k == 1:
        return torch.empty((1, m, n), dtype=x.dtype, device=x.device), 0
    return torch.empty((split_k, m, n), dtype=torch.float32, device=x.device), m * n


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *, config: dict | None = None):
    """y = x @ (qweight * scales[:, None])^T. x (m, k) float; qweight (n, k) int8; scales (n,). Returns (m, n) in x's dtype.

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


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int, *, config: dict | None = None):
    """y = x @ W^T with W dequantised group by group from packed int4 codes, in registers.

    x (m, k) float; qweight (n, kp // 2) uint8 (kp = k rounded up to group_size); scales (n, kp // G)
    float; zeros (n, kp // G) uint8. Returns (m, n) in x's dtype, accumulated in fp32. ``config`` as
    for :func:`int8_matmul`.
    """
    x, qweight, scales, zeros = _check_int4(x, qweight, scales, zeros, group_size)
    m, k = x.shape
    n, kp = qweight.shape[0], 2 * qweight.shape[1]
    cfg = dict(config or _default_for("int4", x, n, group_size))
    split_k = cfg.get("SPLIT_K", 1)
    out, stride_ys = _outputs(x, n, split_k)
    opts = _launch_options(cfg)
    if cfg["path"] == "gemv" and cfg.get("WORDS", False):  # int32 words, one PTX block a word on fp16 inputs
        use_asm = x.dtype == torch.float16 and not INTERPRETER
        if use_asm and (k != kp or x.stride(0) % 4 or x.data_ptr() % 8):
            x = torch.nn.functional.pad(x, (0, kp - k))  # x is read as int64 (4 inputs): whole groups, 8-byte rows
        words = qweight.view(torch.int32)  # (N, KP // 8): four packed bytes a word
        split_len = _split(kp // group_size, split_k, cfg["GROUPS"])
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), m, split_k)
        _int4_gemv_words_kernel[grid](x, words, scales, zeros, out, m, n, k, kp, x.stride(0), words.stride(0), n,
                                      stride_ys, split_len, GROUP=group_size, BLOCK_N=cfg["BLOCK_N"],
                                      GROUPS=cfg["GROUPS"], PREFETCH=int(cfg.get("PREFETCH", True)), USE_ASM=use_asm,
                                      EVEN_K=k == kp, EVEN_G=split_len * split_k == kp // group_size,
                                      STAGES=cfg.get("STAGES"), **opts)
    elif cfg["path"] == "small_m":  # swap-AB: W's tile is the MMA's big side, x's m <= 16 rows the small one
        from kernels.quant_matmul_small_m import launch_int4_small_m  # here: that module imports this one

        launch_int4_small_m(x, qweight, scales, zeros, group_size, cfg, out, stride_ys, opts)
    elif cfg["path"] == "gemv":  # one program per (BLOCK_N rows of W, row of x, split)
        half_math = cfg.get("HALF_MATH", False) and x.dtype == torch.float16
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), m, split_k)
        _int4_gemv_kernel[grid](x, qweight, scales, zeros, out, m, n, k, kp, x.stride(0), qweight.stride(0), n,
                                stride_ys, _split(kp // group_size, split_k, cfg["GROUPS"]),
                                GROUP=group_size, BLOCK_N=cfg["BLOCK_N"], GROUPS=cfg["GROUPS"], MAGIC=cfg["MAGIC"],
                                PREFETCH=cfg.get("PREFETCH", True), HALF_MATH=half_math, USE_ASM=half_math and not INTERPRETER,
                                EVEN_K=k == kp, **opts)
    else:
        dot_dtype, precision = _dot_types(x)
        bits, magic_bits, magic_value = _magic(dot_dtype, "int4")
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), split_k)
        _int4_gemm_kernel[grid](x, qweight, scales, zeros, out, m, n, k, kp, x.stride(0), qweight.stride(0), n,
                                stride_ys, _split(kp // group_size, split_k, cfg.get("GROUPS", 1)),
                                GROUP=group_size, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                GROUPS=cfg.get("GROUPS", 1), DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
                                BITS_DTYPE=bits, MAGIC_BITS=magic_bits, MAGIC_VALUE=magic_value, **opts)
    return out[0] if split_k == 1 else out.sum(0).to(x.dtype)


# ----------------------------------------------------------------------------- plain-torch references
def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(n, k) int8 codes times per-row scales -> (n, k) float."""
    return (qweight.float() * scales.float()[:, None]).to(dtype)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    in_features: int | None = None, dtype=torch.float32) -> torch.Tensor:
    """(n, kp // 2) packed codes -> (n, in_features) float: (q - zero) * scale, group by group."""
    q = unpack_int4(qweight, group_size).float()  # (N, KP)
    n, kp = q.shape
    q = q.reshape(n, kp // group_size, group_size)
    w = (q - zeros.float()[:, :, None]) * scales.float()[:, :, None]
    return w.reshape(n, kp)[:, : (in_features or kp)].to(dtype)


def int8_matmul_ref(x, qweight, scales, *, config=None):
    """Plain-torch :func:`int8_matmul` (dequantise, then an fp32 matmul). ``config`` is ignored."""
    x, qweight, scales = _check_int8(x, qweight, scales)
    return (x.float() @ dequantize_int8(qweight, scales).T).to(x.dtype)


def int4_matmul_ref(x, qweight, scales, zeros, group_size, *, config=None):
    """Plain-torch :func:`int4_matmul` (dequantise, then an fp32 matmul). ``config`` is ignored."""
    x, qweight, scales, zeros = _check_int4(x, qweight, scales, zeros, group_size)
    w = dequantize_int4(qweight, scales, zeros, group_size, x.shape[1])
    return (x.float() @ w.T).to(x.dtype)


# ----------------------------------------------------------------------------- int4 with a float minimum
# GGUF's Q4_1 (and labkit's int4_fminG) store w = q * scale + min per group, min any float. Written out,
#     y[n] = sum_g scale[n, g] * (q[n, g, :] . x[g]) + sum_g min[n, g] * sum(x[g])
# the first sum is exactly the zero-point kernel above with every zero = 0 (the fp16 paths subtract
# 1024 + 0 exactly), the second one small matmul of the groups' input sums (m, KP / G) with the minima:
# 1/G of the weight-side work, no change to the hot loop. (A float zero = -min / scale inside the kernel
# would not be exact in the fp16-pair paths, which subtract 1024 + zero in fp16.) Caveat: the two sums can
# largely cancel, so with fp16 x the kernel's fp16 output rounding is relatively larger than zero-point's.
def _group_sums(x: torch.Tensor, group_size: int, kp: int) -> torch.Tensor:
    """(m, KP / G) fp32: the sum of x over each group of G inputs (zero padding past k)."""
    xf = torch.nn.functional.pad(x.float(), (0, kp - x.shape[1]))
    return xf.reshape(x.shape[0], kp // group_size, group_size).sum(-1)


def _check_int4_fmin(x, qweight, scales, mins, group_size):
    zeros = torch.zeros(scales.shape, dtype=torch.uint8, device=qweight.device)
    x, qweight, scales, zeros = _check_int4(x, qweight, scales, zeros, group_size)
    if mins.shape != scales.shape or mins.dtype not in _FLOATS or mins.device != qweight.device:
        raise ValueError(f"mins must be float {tuple(scales.shape)} on {qweight.device}, got {mins.dtype} "
                         f"{tuple(mins.shape)} on {mins.device}")
    return x, qweight, scales, zeros, mins.contiguous()


def int4_fmin_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                     group_size: int, *, config: dict | None = None):
    """y = x @ W^T with W = q * scale + min group by group (Q4_1's grid): the int4 kernel with zero points 0,
    plus the minima times the groups' input sums. Shapes as :func:`int4_matmul`, ``mins`` like ``scales``."""
    x, qweight, scales, zeros, mins = _check_int4_fmin(x, qweight, scales, mins, group_size)
    y = int4_matmul(x, qweight, scales, zeros, group_size, config=config)
    return (y.float() + _group_sums(x, group_size, 2 * qweight.shape[1]) @ mins.float().T).to(x.dtype)


def dequantize_int4_fmin(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                         in_features: int | None = None, dtype=torch.float32) -> torch.Tensor:
    """(n, kp // 2) packed codes -> (n, in_features) float: q * scale + min, group by group (fp32 maths, in
    the order gguf's own Q4_1 dequantiser uses, so a Q4_1 tensor dequantises to the same bits)."""
    q = unpack_int4(qweight, group_size).float()  # (N, KP)
    n, kp = q.shape
    q = q.reshape(n, kp // group_size, group_size)
    w = q * scales.float()[:, :, None] + mins.float()[:, :, None]
    return w.reshape(n, kp)[:, : (in_features or kp)].to(dtype)


def int4_fmin_matmul_ref(x, qweight, scales, mins, group_size, *, config=None):
    """Plain-torch :func:`int4_fmin_matmul` (dequantise, then an fp32 matmul). ``config`` is ignored."""
    x, qweight, scales, _, mins = _check_int4_fmin(x, qweight, scales, mins, group_size)
    w = dequantize_int4_fmin(qweight, scales, mins, group_size, x.shape[1])
    return (x.float() @ w.T).to(x.dtype)
