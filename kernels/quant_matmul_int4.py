"""int4 weights in groups of G, each with a scale and a zero point: the packing, GEMV, WORDS GEMV and GEMM kernels.

Part of :mod:`kernels.quant_matmul`: its docstring has the overview and the tricks both families share (``MAGIC``,
pointer tensors of the weight tile's shape for x, ``SPLIT_K``), and it re-exports every name defined here. The
float-minimum variant (GGUF's Q4_1) is at the end of this file, the batch 2-16 kernel in
:mod:`kernels.quant_matmul_small_m`.

Layout (written by :mod:`labkit.quant`, read here; ``pack_int4`` / ``unpack_int4`` define it)::

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
    GEMM (m > 1, tensor cores): one program per (BLOCK_M rows of x, BLOCK_N rows of W)
        for each group g:  acc += (x_lo @ ((p & 15) - zero) + x_hi @ ((p >> 4) - zero)) * scale[g]

Tricks, each a constexpr so the plain version stays next to it:
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
"""
from __future__ import annotations

import torch

import labkit.device  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import triton
import triton.language as tl

from kernels.quant_matmul_common import (SUPPORTED_GROUPS, _FLOATS, _check_x, _default_for, _dot_types,
                                         _launch_options, _magic, _outputs, _split)
from labkit.device import INTERPRETER


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


# ----------------------------------------------------------------------------- checks
def _check_padded_k(k: int, kp: int, group_size: int, holder: str) -> None:
    """x's k must round up to whole groups to the kp codes a row of the weight holds."""
    if kp % group_size or not kp - group_size < k <= kp:
        raise ValueError(f"x has k = {k} but {holder} {kp} codes a row: expected k rounded up to a multiple "
                         f"of group_size {group_size} to equal {kp}")


def _check_int4(x, qweight, scales, zeros, group_size):
    if group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUPS}, got {group_size}")
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise ValueError(f"int4 qweight must be 2-D uint8 (n, k_padded // 2), got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    x = _check_x(x, qweight)
    n, kp = qweight.shape[0], 2 * qweight.shape[1]
    _check_padded_k(x.shape[1], kp, group_size, "qweight holds")
    want = (n, kp // group_size)
    if scales.shape != want or scales.dtype not in _FLOATS or scales.device != qweight.device:
        raise ValueError(f"scales must be float {want} on {qweight.device}, got {scales.dtype} {tuple(scales.shape)} "
                         f"on {scales.device}")
    if zeros.shape != want or zeros.dtype != torch.uint8 or zeros.device != qweight.device:
        raise ValueError(f"zeros must be uint8 {want} on {qweight.device}, got {zeros.dtype} {tuple(zeros.shape)} "
                         f"on {zeros.device}")
    return x, qweight.contiguous(), scales.contiguous(), zeros.contiguous()


# ----------------------------------------------------------------------------- wrappers
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
                                PREFETCH=cfg.get("PREFETCH", True), HALF_MATH=half_math,
                                USE_ASM=half_math and not INTERPRETER, EVEN_K=k == kp, **opts)
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
def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    in_features: int | None = None, dtype=torch.float32) -> torch.Tensor:
    """(n, kp // 2) packed codes -> (n, in_features) float: (q - zero) * scale, group by group."""
    q = unpack_int4(qweight, group_size).float()  # (N, KP)
    n, kp = q.shape
    q = q.reshape(n, kp // group_size, group_size)
    w = (q - zeros.float()[:, :, None]) * scales.float()[:, :, None]
    return w.reshape(n, kp)[:, : (in_features or kp)].to(dtype)


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
