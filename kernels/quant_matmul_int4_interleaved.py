"""int4 GEMV, an experiment after WORDS: four rows' words side by side, so that one load of x serves four rows.

What you will learn
-------------------
The WORDS GEMV (kernels/quant_matmul_int4.py) unpacks a 32-bit word of eight int4 codes in one inline-PTX block, yet
it executes ~4-5 instructions a weight (``python -m labkit.bench quant_sass`` / ``quant_profile``), and an H200 SM
can issue only ~4 a weight while its share of memory bandwidth delivers 32 int4 weights a clock: the kernel is
issue-bound. Its SASS shows where the rest goes: a word's eight weights need 16 bytes of x, and each thread holds
words of ONE row, so every row loads x again (8 of 14 loads in the loop are x, 4 times the weight bytes, each
with its own address arithmetic).

This version changes the layout, not the maths: the words of rows 4r..4r+3 at the same position of k are stored
next to each other,

    words[N / 4, K / 8, 4] int32:   words[r, w, j] = word w of row 4r + j       (scales, zeros: [N / 4, K / G, 4])

so one 16-byte load brings four rows' words, and the x those words need is loaded once and used four times
(the prediction: the loop's x loads fall 4x, and with them most of its address arithmetic). The dot of each
word is the same PTX as WORDS (_INT4_WORD_DOT_ASM). It is Marlin's idea in small: repack the weights once, at
load time, into the order the kernel reads them.

    for each program: 4 * BLOCKS rows, one row of x
        for each step of GROUPS groups:                 (the next step's loads issued before this step's maths)
            p  = words[rows/4, step, :, 4]              one 16-byte load = 4 rows x 8 weights
            x  = x[step]                                once, for the 4 rows
            acc[row] += scale[row, g] * dot(p[row], x)  one PTX block a word

Result (H200, ``python -m labkit.bench quant_matmul --impls fp16_cublas,labkit_int4_g128,labkit_int4_g128_interleaved
--batches 1 --sweep`` -> data/bench/quant_matmul_interleaved.json; ``quant_profile``, ``quant_sass``): the idea did
not pay. The loop's loads fell from 14 to 6 and its instructions from 3.69 to 3.39 a weight, as predicted, but with
each kernel's best configuration it is 8-17% slower than WORDS on two of the three Llama-3-8B shapes and 5% faster
on the down projection; at the default configuration, in a stream of calls, 24-49% slower. The counters say why: the
broadcast of x over the four rows is a layout conversion that Triton routes through shared memory (STS, LDS and
two barriers a step in the loop; ``barrier`` and ``short_scoreboard`` stalls that WORDS does not have), and the
whole kernel still executes ~4.9 instructions a weight. (Loading x through pointers of the words tile's shape,
equal along the rows, measured the same.) Keeping a register broadcast needs control of the layouts that plain
Triton does not give; it stays here as the measured experiment, beside WORDS, which remains the default.

Limits: fp16 x for the PTX path (bf16 / fp32 x, and the interpreter, use fp32 maths, one nibble at a time); no
split of k. The weight is repacked by :func:`interleave_int4` from the plain layout (labkit.quant's QuantLinear).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.quant_matmul_common import _FLOATS, INTERPRETER, SUPPORTED_GROUPS, _check_x, _launch_options
from kernels.quant_matmul_int4 import _INT4_WORD_DOT_ASM, _check_padded_k

ROWS = 4  # rows whose words sit side by side (one 16-byte load)
DEFAULT_CONFIG = dict(BLOCKS=1, GROUPS=16, PREFETCH=True, num_warps=4)  # 4 rows x 2048 weights a step


def interleave_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    rows: int = ROWS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain int4 layout (qweight (n, kp // 2) uint8, scales and zeros (n, kp // G)) -> the interleaved one:
    words (ceil(n / rows), kp // 8, rows) int32, scales and zeros (ceil(n / rows), kp // G, rows). Rows past n
    are zero (their outputs are never stored)."""
    n, half = qweight.shape
    if half % 4:
        raise ValueError(f"qweight has {half} bytes a row; the interleaved layout needs whole 4-byte words")
    pad = -n % rows

    def blocks(t: torch.Tensor) -> torch.Tensor:  # (n, c) -> (ceil(n / rows), c, rows)
        t = torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t
        return t.reshape(-1, rows, t.shape[1]).transpose(1, 2).contiguous()

    return blocks(qweight.contiguous().view(torch.int32)), blocks(scales), blocks(zeros)


def deinterleave_int4(words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, n: int):
    """The inverse of :func:`interleave_int4`: back to (qweight, scales, zeros) of n rows."""
    def rows_of(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(-1, t.shape[1])[:n]

    return rows_of(words).contiguous().view(torch.uint8), rows_of(scales), rows_of(zeros)


@triton.jit
def _interleaved_loads(w_rows, s_rows, z_rows, g0, num_groups, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                       ROWS_: tl.constexpr, EVEN_G: tl.constexpr):
    """One step: words (BLOCKS, GROUPS, G/8, ROWS) int32, scales and zeros (BLOCKS, GROUPS, ROWS)."""
    WPG: tl.constexpr = GROUP // 8
    g = g0 + tl.arange(0, GROUPS)
    i = tl.arange(0, WPG)
    w_ptrs = w_rows + ((g * WPG)[None, :, None, None] + i[None, None, :, None]) * ROWS_
    gs = (g * ROWS_)[None, :, None]
    if EVEN_G:
        return tl.load(w_ptrs), tl.load(s_rows + gs), tl.load(z_rows + gs)
    valid = (g < num_groups)[None, :, None]
    return tl.load(w_ptrs, mask=valid[:, :, :, None]), tl.load(s_rows + gs, mask=valid), tl.load(z_rows + gs,
                                                                                                 mask=valid)


@triton.jit
def _interleaved_dot(p, z, x_row, g0, num_groups, K, GROUP: tl.constexpr, GROUPS: tl.constexpr,
                     USE_ASM: tl.constexpr, EVEN_G: tl.constexpr):
    """(BLOCKS, GROUPS, G/8, ROWS) fp32: each word's eight (q - zero) * x, not yet scaled. x is loaded as a
    (1, GROUPS, G/8, 1) tile and broadcast over the blocks and the four rows."""
    WPG: tl.constexpr = GROUP // 8
    g = g0 + tl.arange(0, GROUPS)
    i = tl.arange(0, WPG)
    valid = (g < num_groups)[None, :, None, None]  # (1, NG, 1, 1)
    if USE_ASM:  # word i of group g needs x64[g * G/4 + i] (low nibbles) and x64[g * G/4 + G/8 + i] (high)
        x64 = x_row.to(tl.pointer_type(tl.int64))
        idx = (g * (GROUP // 4))[None, :, None, None] + i[None, None, :, None]  # (1, NG, WPG, 1)
        if EVEN_G:
            x_lo, x_hi = tl.load(x64 + idx), tl.load(x64 + idx + WPG)
        else:
            x_lo, x_hi = tl.load(x64 + idx, mask=valid, other=0), tl.load(x64 + idx + WPG, mask=valid, other=0)
        zz = (z.to(tl.int32) | 0x6400) * 0x10001  # fp16 pair (1024 + zero, 1024 + zero), (BLOCKS, NG, ROWS)
        return tl.inline_asm_elementwise(_INT4_WORD_DOT_ASM, "=r,r,l,l,r",
                                         [p, tl.broadcast_to(x_lo, p.shape), tl.broadcast_to(x_hi, p.shape),
                                          tl.broadcast_to(zz[:, :, None, :], p.shape)],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:  # one nibble at a time in fp32 (the interpreter; bf16 and fp32 x)
        zf = z.to(tl.float32)[:, :, None, :]
        k_lo = (g * GROUP)[None, :, None, None] + 4 * i[None, None, :, None]  # input of byte 0's low nibble
        part = tl.zeros(p.shape, tl.float32)
        for b in tl.static_range(4):
            lo = ((p >> (8 * b)) & 15).to(tl.float32)
            hi = ((p >> (8 * b + 4)) & 15).to(tl.float32)
            x_lo = tl.load(x_row + k_lo + b, mask=valid & (k_lo + b < K), other=0.0).to(tl.float32)
            x_hi = tl.load(x_row + k_lo + GROUP // 2 + b, mask=valid & (k_lo + GROUP // 2 + b < K),
                           other=0.0).to(tl.float32)
            part += (lo - zf) * x_lo + (hi - zf) * x_hi
        return part


@triton.jit
def _int4_gemv_interleaved_kernel(
    x_ptr,  # [M, K] (USE_ASM: fp16, K == KP, rows 8-byte aligned)
    w_ptr,  # [NB, KP // 8, ROWS_] int32
    s_ptr,  # [NB, KP // GROUP, ROWS_] scales
    z_ptr,  # [NB, KP // GROUP, ROWS_] uint8 zero points
    y_ptr,  # [M, N] x's dtype
    N, NB, K, KP, stride_xm, stride_ym,
    GROUP: tl.constexpr, ROWS_: tl.constexpr,
    BLOCKS: tl.constexpr,  # row blocks (of ROWS_ rows) a program
    GROUPS: tl.constexpr,  # groups a step
    PREFETCH: tl.constexpr, USE_ASM: tl.constexpr, EVEN_G: tl.constexpr,
):
    pid = tl.program_id(0)
    m = tl.program_id(1)
    num_groups = KP // GROUP
    blk = tl.minimum(pid * BLOCKS + tl.arange(0, BLOCKS), NB - 1)  # past the end: the last block, never stored
    j = tl.arange(0, ROWS_)
    w_rows = w_ptr + blk[:, None, None, None] * ((KP // 8) * ROWS_) + j[None, None, None, :]  # (BLOCKS, 1, 1, R)
    s_rows = s_ptr + blk[:, None, None] * (num_groups * ROWS_) + j[None, None, :]  # (BLOCKS, 1, R)
    z_rows = z_ptr + blk[:, None, None] * (num_groups * ROWS_) + j[None, None, :]
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros((BLOCKS, GROUPS, GROUP // 8, ROWS_), tl.float32)
    if PREFETCH:
        p, s, z = _interleaved_loads(w_rows, s_rows, z_rows, 0, num_groups, GROUP, GROUPS, ROWS_, EVEN_G)
    for g0 in range(0, num_groups, GROUPS):
        if PREFETCH:  # the step after the last wraps round to the first (in bounds, unused)
            g_next = tl.where(g0 + GROUPS < num_groups, g0 + GROUPS, 0)
            p_n, s_n, z_n = _interleaved_loads(w_rows, s_rows, z_rows, g_next, num_groups, GROUP, GROUPS, ROWS_,
                                               EVEN_G)
        else:
            p, s, z = _interleaved_loads(w_rows, s_rows, z_rows, g0, num_groups, GROUP, GROUPS, ROWS_, EVEN_G)
        part = _interleaved_dot(p, z, x_row, g0, num_groups, K, GROUP, GROUPS, USE_ASM, EVEN_G)
        acc += part * s.to(tl.float32)[:, :, None, :]
        if PREFETCH:
            p, s, z = p_n, s_n, z_n
    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BLOCKS, R)
    rows = (pid * BLOCKS + tl.arange(0, BLOCKS))[:, None] * ROWS_ + j[None, :]
    tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


def int4_matmul_interleaved(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                            n: int, group_size: int, *, config: dict | None = None) -> torch.Tensor:
    """y = x @ W^T for W in :func:`interleave_int4`'s layout (n: W's rows). x (m, k) float; returns (m, n) in
    x's dtype. ``config``: BLOCKS, GROUPS, PREFETCH, num_warps (default :data:`DEFAULT_CONFIG`)."""
    if group_size not in SUPPORTED_GROUPS:
        raise ValueError(f"group_size must be one of {SUPPORTED_GROUPS}, got {group_size}")
    if words.dim() != 3 or words.dtype != torch.int32:
        raise ValueError(f"words must be interleave_int4's (n / rows, kp / 8, rows) int32, got "
                         f"{tuple(words.shape)} {words.dtype}")
    nb, kw, rows = words.shape
    if not (nb - 1) * rows < n <= nb * rows:
        raise ValueError(f"n = {n} does not fit {nb} blocks of {rows} rows; pass the weight's out_features")
    x = _check_x(x, words)
    kp = 8 * kw
    _check_padded_k(x.shape[1], kp, group_size, "the words hold")
    want = (nb, kp // group_size, rows)
    for name, t, dtypes in (("scales", scales, _FLOATS), ("zeros", zeros, (torch.uint8,))):
        if tuple(t.shape) != want or t.dtype not in dtypes or t.device != words.device:
            raise ValueError(f"{name} must be {want} {dtypes[0] if len(dtypes) == 1 else 'float'} on {words.device} "
                             f"(interleave_int4's), got {t.dtype} {tuple(t.shape)} on {t.device}")
    scales, zeros = scales.contiguous(), zeros.contiguous()
    m, k = x.shape
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    use_asm = x.dtype == torch.float16 and not INTERPRETER
    if use_asm and (k != kp or x.stride(0) % 4 or x.data_ptr() % 8):
        x = torch.nn.functional.pad(x, (0, kp - k))  # read as int64: whole groups, 8-byte rows
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    num_groups = kp // group_size
    grid = (triton.cdiv(nb, cfg["BLOCKS"]), m)
    opts = _launch_options(cfg)
    _int4_gemv_interleaved_kernel[grid](x, words, scales, zeros, out, n, nb, k, kp, x.stride(0), out.stride(0),
                                        GROUP=group_size, ROWS_=rows, BLOCKS=cfg["BLOCKS"], GROUPS=cfg["GROUPS"],
                                        PREFETCH=bool(cfg["PREFETCH"]), USE_ASM=use_asm,
                                        EVEN_G=num_groups % cfg["GROUPS"] == 0, **opts)
    return out
