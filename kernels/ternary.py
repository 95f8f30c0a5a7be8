"""Ternary weights (BitNet b1.58): 2-bit packing and a matmul that unpacks them in registers.

What you will learn
- How a weight that can only be -1, 0 or +1 is stored in 2 bits, four to a byte.
- How a kernel reads those bytes, turns them back into -1/0/+1 in registers (shift, mask, subtract)
  and multiplies, so the weights cross device memory at 2 bits each instead of 16.
- Why one scale per row is enough: W ~= scale[n] * T[n, :], so x @ W^T = (x @ T^T) * scale.

Bit layout (fixed; ``pack_ternary`` writes it, the kernel and ``unpack_ternary`` read it).
Row n of a (N, K) ternary matrix becomes K // 4 bytes; byte j holds weights 4j .. 4j+3, lowest
bits first, each stored as ``code = w + 1``::

    bit:       7 6     5 4     3 2     1 0
             [ w4j+3 | w4j+2 | w4j+1 | w4j+0 ]      code 0b00 -> -1, 0b01 -> 0, 0b10 -> +1 (0b11 unused)

    e.g. weights (+1, 0, -1, +1)  ->  codes (2, 1, 0, 2)  ->  0b10_00_01_10 = 0x86

Blocked algorithm (one program per BLOCK_M rows of x and BLOCK_N rows of W)::

    acc[BLOCK_M, BLOCK_N] = 0                                   # fp32
    for each run of BLOCK_KB bytes (4 * BLOCK_KB weights) along K:
        b = packed[n-block, byte-run]                           # uint8 [BLOCK_N, BLOCK_KB]
        for i in 0, 1, 2, 3:                                    # the i-th 2-bit field of every byte
            t_i = ((b >> 2i) & 3) - 1                           # -1/0/+1 [BLOCK_N, BLOCK_KB], in registers
            x_i = x[m-block, 4 * byte + i]                      # [BLOCK_M, BLOCK_KB]
            acc += x_i @ t_i^T
    out = acc * scale[n]

Small batches (m <= 4, a GEMV) use plain multiply-adds into a (BLOCK_M, BLOCK_N, BLOCK_KB) accumulator
that is summed over K once, after the loop; larger ones use ``tl.dot`` (tensor cores on the GPU). The
reference ``ternary_matmul_ref`` unpacks with torch and does the same arithmetic.

Measured on an H200 (data/bench/quant_matmul.json, notebook 10): 8x fewer bytes than fp16 is *not* 8x
faster. Per packed byte the kernel does four shift / mask / float-building steps and four multiply-adds
per row of x, so it is bound by instructions long before memory.

v2, the words GEMV (``ternary_matmul_words``, fp16 x, m = 1): a second layout, ``pack_ternary_words``, made for
the unpacking rather than for reading by eye. 16 weights make an int32 word; in each word the two weights that
share an fp16 pair of x sit 16 bits apart (bits 2s and 16 + 2s), so one LOP3 lifts both codes into an fp16 pair
at once, and the word's four int64 of x are each contiguous across neighbouring words (vector loads)::

    for each step of BLOCKS x 16 words of the BLOCK_N rows:           # one 16-byte load: 4 words = 64 weights
        for each word w (16 weights) and its 4 int64 of x (16 inputs, 8 fp16 pairs):
            sh = w >> 10                                              # 1 SHR: slots 5..7 into the mantissa
            for slot s in 0..7:                                       # a pair of weights
                q = (w or sh) & (3 << 2s, both lanes) | 0x6400       # 1 LOP3: fp16 pair 1024 + c * 4**s
                t = q * 4**-s - (1024 * 4**-s + 1)                    # 1 HFMA2: c - 1 = -1 / 0 / +1, exact
                a = t * x_pair + a                                    # 1 HFMA2 (the first an HMUL2)
            acc += f32(a.lo) + f32(a.hi)                              # 2 widenings, 2 FADDs
    y = sum(acc) * scale

Expected: 29 instructions for 16 weights in the word's PTX block, 1.8 a weight, ~2 with the loads (a quarter of
a 16-byte load for the word, two 16-byte loads for its x); the fp32 path above spends ~7. The ``select`` form
(x where +1 minus x where -1, via masks) needs a 16-bit all-ones mask per weight, which 2 stored bits cannot
give without more instructions than the HFMA2 it would replace. The fp16 bound: the products are exact (+-x or
0), 8 of them summed per lane before widening, so |x| must stay below 65504 / 8 ~ 8,000; the rounding of those
sums (7 fp16 additions) is the only error beyond fp32's.

Measured (H200, m = 1, data/bench/quant_matmul_words.json): v2 runs 2.24-2.91x fp16 cuBLAS on Llama-3-8B's
shapes where v1 ran 1.44-1.58x; the bytes would allow ~7.5-8x. Fitted over two shapes it costs ~6 us a call
plus ~1.9 TB/s of streaming: the fixed cost of a call and too few bytes in flight, not the unpacking, are what is
left.
"""
from __future__ import annotations

import torch

import labkit.device  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import triton
import triton.language as tl

from labkit.device import INTERPRETER

# code = weight + 1, two bits per weight, weight 4j + i in bits 2i..2i+1 of byte j
_SHIFTS = (0, 2, 4, 6)


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Pack a ternary matrix (N, K) with values in {-1, 0, +1} into (N, K // 4) uint8, four weights a byte.

    See the module docstring for the bit layout. K must be a multiple of 4.
    """
    if t.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D (N, K) matrix, got shape {tuple(t.shape)}")
    n, k = t.shape
    if k % 4:
        raise ValueError(f"K = {k} is not a multiple of 4: pad the input dimension before packing")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError("pack_ternary expects integer values -1, 0, +1; ternarise the weights first")
    codes = t.to(torch.int16) + 1  # -1/0/+1 -> 0/1/2
    if codes.min() < 0 or codes.max() > 2:
        raise ValueError("pack_ternary expects values in {-1, 0, +1}")
    codes = codes.to(torch.uint8).view(n, k // 4, 4)  # (N, K/4, 4): the four weights of each byte
    packed = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    return packed.contiguous()


def unpack_ternary(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: (N, K // 4) uint8 -> (N, K) with values -1, 0, +1."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_ternary expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    n, kb = packed.shape
    fields = [((packed >> s) & 3) for s in _SHIFTS]  # 4 x (N, K/4)
    codes = torch.stack(fields, dim=-1).view(n, kb * 4)  # (N, K): weight 4j+i is field i of byte j
    return (codes.to(torch.int16) - 1).to(dtype)


def _check(x: torch.Tensor, packed: torch.Tensor, scale, k_multiple: int = 4) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (m, k), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor (n, k // 4), got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] * 4 != x.shape[1]:
        raise ValueError(
            f"packed holds {packed.shape[1] * 4} weights a row but x has k = {x.shape[1]}: "
            "packed must be (n, k // 4) with four 2-bit weights a byte"
        )
    if x.shape[1] % k_multiple:
        raise ValueError(f"the words layout needs k a multiple of {k_multiple}, got k = {x.shape[1]}: "
                         "use pack_ternary and ternary_matmul")
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device} but packed is on {packed.device}")
    n = packed.shape[0]
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    if scale.numel() == 1:
        scale = scale.reshape(1).expand(n)
    elif scale.shape != (n,):
        raise ValueError(f"scale must be a scalar or have shape ({n},) (one per output row), got {tuple(scale.shape)}")
    return scale.to(torch.float32).contiguous()


def ternary_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scale) -> torch.Tensor:
    """Plain-torch reference: unpack to -1/0/+1, x @ T^T in fp32, times the per-row scale. Returns (m, n) in x.dtype."""
    scale = _check(x, packed, scale)
    t = unpack_ternary(packed, torch.float32)  # (N, K)
    return ((x.float() @ t.T) * scale[None, :]).to(x.dtype)


@triton.jit
def _code_to_weight(code, DTYPE: tl.constexpr):
    """2-bit code (0, 1, 2, int32) -> weight -1.0 / 0.0 / +1.0 in DTYPE, without an int-to-float conversion.

    Conversions run on a GPU unit that does 16 a clock per SM, too slow for one per weight. Instead the
    code goes into the low mantissa bits of a float whose exponent makes one mantissa step worth 1:
    fp32 bits 0x4B000000 are 2**23, fp16 0x6400 is 1024, bf16 0x4300 is 128; OR in the code, subtract
    that constant + 1, and -1 / 0 / +1 is left, exactly.
    """
    if DTYPE == tl.float16:
        return (code.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1025.0
    elif DTYPE == tl.bfloat16:
        return (code.to(tl.int16) | 0x4300).to(tl.bfloat16, bitcast=True) - 129.0
    else:
        return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388609.0


@triton.jit
def _ternary_matmul_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32, unit stride along K
    w_ptr,  # [N, K // 4] uint8, four 2-bit codes a byte (layout in the module docstring)
    scale_ptr,  # [N] fp32, one scale per output row
    out_ptr,  # [M, N], x's dtype
    M, N, K,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,  # bytes of a W row per step = 4 * BLOCK_KB weights
    USE_DOT: tl.constexpr,  # tl.dot (m >= 16) or multiply-add + row sum (small m)
    DOT_DTYPE: tl.constexpr,  # operand dtype for tl.dot: x's dtype on the GPU, fp32 in the interpreter
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 x (tl.dot's GPU default would be tf32)
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_KB)
    mask_m = offs_m < M
    mask_n = offs_n < N
    num_bytes = K // 4

    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:  # GEMV: multiply-add elementwise into a 3-D accumulator, reduce over K once at the end
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KB), dtype=tl.float32)
    for b0 in range(0, num_bytes, BLOCK_KB):
        bytes_ = b0 + offs_b
        mask_b = bytes_ < num_bytes
        packed = tl.load(  # uint8 [BLOCK_N, BLOCK_KB]: the only read of W, 2 bits a weight
            w_ptr + offs_n[:, None] * stride_wn + bytes_[None, :],
            mask=mask_n[:, None] & mask_b[None, :],
            other=0,
        ).to(tl.int32)
        for i in tl.static_range(4):
            code = (packed >> (2 * i)) & 3  # [BLOCK_N, BLOCK_KB] in 0..2
            x = tl.load(  # [BLOCK_M, BLOCK_KB]: inputs 4j + i, the ones field i multiplies
                x_ptr + offs_m[:, None] * stride_xm + (4 * bytes_ + i)[None, :],
                mask=mask_m[:, None] & mask_b[None, :],
                other=0.0,
            )
            if USE_DOT:
                t = _code_to_weight(code, DOT_DTYPE)
                acc += tl.dot(x.to(DOT_DTYPE), tl.trans(t), input_precision=DOT_PRECISION)
            else:
                t = _code_to_weight(code, tl.float32)
                acc += x.to(tl.float32)[:, None, :] * t[None, :, :]  # (M, 1, KB) * (1, N, KB)

    if USE_DOT:
        res = acc
    else:
        res = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    out = res * scale[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_m[:, None] & mask_n[None, :],
    )


_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _config(m: int, n: int, k: int) -> dict:
    """Block sizes chosen by hand (no autotuning, so the interpreter and the GPU run the same code).

    Small m is a GEMV: each step loads BLOCK_N x BLOCK_KB = 4 KB of packed weights (32 bytes a thread)
    and 16 rows a program gives every SM several programs. These settings were the fastest of a few
    timed on an H200 for m = 1 and 4 on Llama-3-8B's shapes (BLOCK_N 8-32, BLOCK_KB 64-256).
    """
    if m <= 4:
        return dict(BLOCK_M=triton.next_power_of_2(m), BLOCK_N=16, BLOCK_KB=256, USE_DOT=False, num_warps=4)
    # tl.dot path: of the two settings timed on an H200, 32 rows x 128 bytes won for n = 4096 and
    # 64 rows x 32 bytes for n = 14336 (m = 8..64). Both stay well behind fp16 cuBLAS here.
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n, block_kb = (32, 128) if n <= 8192 else (64, 32)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KB=block_kb, USE_DOT=True, num_warps=4)


def ternary_matmul(x: torch.Tensor, packed: torch.Tensor, scale, config: dict | None = None) -> torch.Tensor:
    """out = x @ (scale * T)^T with T the ternary matrix stored in ``packed``.

    x: (m, k) fp16/bf16/fp32. packed: (n, k // 4) uint8, four 2-bit weights a byte (see module
    docstring). scale: a scalar or (n,) fp32 (one per output row). Returns (m, n) in x's dtype,
    accumulated in fp32. ``config`` overrides launch settings of :func:`_config` (BLOCK_M, BLOCK_N,
    BLOCK_KB, USE_DOT, num_warps, num_stages), for tuning.
    """
    scale = _check(x, packed, scale)
    if x.stride(1) != 1:
        x = x.contiguous()
    packed = packed.contiguous()
    m, k = x.shape
    n = packed.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = {**_config(m, n, k), **(config or {})}
    unknown = set(cfg) - {"BLOCK_M", "BLOCK_N", "BLOCK_KB", "USE_DOT", "num_warps", "num_stages"}
    if unknown:
        raise ValueError(f"unknown launch settings {sorted(unknown)}")
    # (the interpreter's tl.dot mishandles bf16, which it stores as raw bits: there bf16 multiplies in fp32)
    dot_dtype = tl.float32 if INTERPRETER and x.dtype == torch.bfloat16 else _TL_DTYPE[x.dtype]
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]))
    _ternary_matmul_kernel[grid](
        x, packed, scale, out,
        m, n, k,
        x.stride(0), packed.stride(0), out.stride(0),
        DOT_DTYPE=dot_dtype,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        **cfg,
    )
    return out


# ----------------------------------------------------------------------------- v2: the words layout and GEMV
# Block of 256 weights = 16 int32 words; word i of block b holds the 16 weights that the four int64 of x
# x64[64b + i + 16j] (j = 0..3, four fp16 inputs each) multiply. Slot s = 2j + h (h: which fp16 pair of that
# int64) keeps the pair's first weight in bits 2s..2s+1 (low 16-bit lane) and its second in bits 16+2s.. (high
# lane), as code w + 1: a pair of codes that one LOP3 can lift into an fp16 pair.
WORDS_BLOCK = 256  # weights a block; K must be a multiple of it
_WORDS_PER_BLOCK = 16


def pack_ternary_words(t: torch.Tensor) -> torch.Tensor:
    """Pack a ternary (N, K) matrix into the words layout above: (N, K // 4) uint8, the bytes of (N, K // 16)
    little-endian int32 words. K must be a multiple of 256."""
    if t.dim() != 2:
        raise ValueError(f"pack_ternary_words expects a 2-D (N, K) matrix, got shape {tuple(t.shape)}")
    n, k = t.shape
    if k % WORDS_BLOCK:
        raise ValueError(f"K = {k} is not a multiple of {WORDS_BLOCK}: use pack_ternary (bytes layout) or pad K")
    codes = pack_ternary(t)  # validates the values; the bytes layout's codes are re-read below
    codes = unpack_ternary(codes, torch.int64) + 1  # (N, K) codes 0..2
    codes = codes.view(n, k // WORDS_BLOCK, 4, _WORDS_PER_BLOCK, 2, 2)  # (N, blocks, j, i, h, lane): k = 64j+4i+2h+lane
    shifts = torch.tensor([[2 * (2 * j + h) + 16 * lane for h in range(2) for lane in range(2)] for j in range(4)])
    shifts = shifts.view(4, 1, 2, 2).to(codes.device)  # (j, 1, h, lane)
    words = (codes << shifts).sum(dim=(2, 4, 5))  # (N, blocks, i) int64: disjoint bits, so the sum is an OR
    byte_shifts = torch.arange(0, 32, 8, device=codes.device)
    return ((words[..., None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(n, k // 4).contiguous()


def unpack_ternary_words(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_ternary_words`: (N, K // 4) uint8 -> (N, K) with values -1, 0, +1."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_ternary_words expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    n, kb = packed.shape
    if (4 * kb) % WORDS_BLOCK:
        raise ValueError(f"{4 * kb} weights a row is not a multiple of {WORDS_BLOCK}")
    b = packed.to(torch.int64).view(n, kb // 4, 4)
    words = (b << torch.arange(0, 32, 8, device=packed.device)).sum(-1)  # (N, K // 16)
    words = words.view(n, 4 * kb // WORDS_BLOCK, 1, _WORDS_PER_BLOCK, 1, 1)  # (N, blocks, j, i, h, lane)
    shifts = torch.tensor([[2 * (2 * j + h) + 16 * lane for h in range(2) for lane in range(2)] for j in range(4)])
    codes = (words >> shifts.view(4, 1, 2, 2).to(packed.device)) & 3  # (N, blocks, 4, 16, 2, 2)
    return (codes.reshape(n, 4 * kb) - 1).to(dtype)


def ternary_matmul_words_ref(x: torch.Tensor, packed: torch.Tensor, scale) -> torch.Tensor:
    """Plain-torch :func:`ternary_matmul_words`: unpack the words layout, x @ T^T in fp32, times the scale."""
    scale = _check(x, packed, scale, WORDS_BLOCK)
    t = unpack_ternary_words(packed, torch.float32)  # (N, K)
    return ((x.float() @ t.T) * scale[None, :]).to(x.dtype)


def _f16_pair(value: float) -> str:
    """The 32-bit pattern of the fp16 pair (value, value), as PTX hex."""
    bits = int(torch.tensor(value, dtype=torch.float16).view(torch.int16)) & 0xFFFF
    return f"0x{bits:04X}{bits:04X}"


# Slot s of a word: (register it is read from, LOP3 mask, fp16 scale, fp16 offset). Slots 0..4 sit in bits 2s, inside
# fp16's 10 mantissa bits: LOP3 (w & mask) | 0x6400 is 1024 + c * 4**s, and one HFMA2 * 4**-s - (1024 * 4**-s + 1)
# leaves c - 1 = -1 / 0 / +1, exactly. Slots 5..7 (bits 10..15) are first shifted down by 10 (one SHR a word).
TERNARY_SLOTS = tuple(("w" if s < 5 else "sh", 0x00030003 << (2 * (s % 5 if s < 5 else s - 5)),
                       4.0 ** -(s if s < 5 else s - 5), -(1024.0 * 4.0 ** -(s if s < 5 else s - 5) + 1.0))
                      for s in range(8))


def _ternary_word_dot_ptx() -> str:
    """The PTX of one word: inputs $1 (the word), $2..$5 (four int64 of x), output $0 (fp32 dot product)."""
    lines = ["{", ".reg .b32 w, sh, q, c, o, a, x0, x1, x2, x3, x4, x5, x6, x7;", ".reg .b16 h0, h1;",
             ".reg .f32 f0, f1;", "mov.b32 w, $1;", "mov.b64 {x0, x1}, $2;", "mov.b64 {x2, x3}, $3;",
             "mov.b64 {x4, x5}, $4;", "mov.b64 {x6, x7}, $5;", "shr.b32 sh, w, 10;"]
    for s, (src, mask, scale, offset) in enumerate(TERNARY_SLOTS):
        lines += [f"lop3.b32 q, {src}, 0x{mask:08X}, 0x64006400, 0xEA;",
                  f"mov.b32 c, {_f16_pair(scale)};", f"mov.b32 o, {_f16_pair(offset)};", "fma.rn.f16x2 q, q, c, o;",
                  "mul.f16x2 a, q, x0;" if s == 0 else f"fma.rn.f16x2 a, q, x{s}, a;"]
    lines += ["mov.b32 {h0, h1}, a;", "cvt.f32.f16 f0, h0;", "cvt.f32.f16 f1, h1;", "add.f32 $0, f0, f1;", "}"]
    return "\n".join(lines)


_TERNARY_WORD_DOT_ASM = tl.constexpr(_ternary_word_dot_ptx())


@triton.jit
def _ternary_words_loads(w_rows, b0, b_end, BLOCKS: tl.constexpr, EVEN: tl.constexpr):
    """One step's weight loads: [BLOCK_N, BLOCKS, 16] int32 words. With EVEN no load is masked."""
    blk = b0 + tl.arange(0, BLOCKS)  # (NB,)
    ptrs = w_rows + (blk * 16)[None, :, None] + tl.arange(0, 16)[None, None, :]  # (BN, NB, 16)
    if EVEN:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=(blk < b_end)[None, :, None], other=0)


@triton.jit
def _ternary_words_dot(p, x_row, b0, b_end, BLOCKS: tl.constexpr, USE_ASM: tl.constexpr, EVEN: tl.constexpr):
    """(BN, NB, 16) fp32: for every word, the sum of its sixteen w * x."""
    blk = b0 + tl.arange(0, BLOCKS)
    q = (blk * 64)[None, :, None] + tl.arange(0, 16)[None, None, :]  # (1, NB, 16): x64 index of word i's slots 0, 1
    valid = (blk < b_end)[None, :, None]
    if USE_ASM:  # four int64 of x a word, each contiguous along i: vector loads, p's shape and layout
        x64 = x_row.to(tl.pointer_type(tl.int64))
        if EVEN:
            x0, x1, x2, x3 = tl.load(x64 + q), tl.load(x64 + q + 16), tl.load(x64 + q + 32), tl.load(x64 + q + 48)
        else:
            x0 = tl.load(x64 + q, mask=valid, other=0)
            x1 = tl.load(x64 + q + 16, mask=valid, other=0)
            x2 = tl.load(x64 + q + 32, mask=valid, other=0)
            x3 = tl.load(x64 + q + 48, mask=valid, other=0)
        return tl.inline_asm_elementwise(_TERNARY_WORD_DOT_ASM, "=r,r,l,l,l,l", [p, x0, x1, x2, x3],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:  # the same sums slot by slot in fp32 (the interpreter; bf16 and fp32 inputs)
        part = tl.zeros(p.shape, tl.float32)
        for s in tl.static_range(8):  # slot s: inputs 4 * (q + 16 * (s // 2)) + 2 * (s % 2) and the next one
            k = 4 * (q + 16 * (s // 2)) + 2 * (s % 2)
            lo = ((p >> (2 * s)) & 3).to(tl.float32) - 1.0
            hi = ((p >> (16 + 2 * s)) & 3).to(tl.float32) - 1.0
            x_lo = tl.load(x_row + k, mask=valid, other=0.0).to(tl.float32)
            x_hi = tl.load(x_row + k + 1, mask=valid, other=0.0).to(tl.float32)
            part += lo * x_lo + hi * x_hi
        return part


@triton.jit
def _ternary_gemv_words_kernel(
    x_ptr,  # [M, K] fp16 / bf16 / fp32, unit stride along K (USE_ASM: fp16, rows 8-byte aligned)
    w_ptr,  # [N, K // 16] int32 words of the words layout, row stride stride_wn (in words)
    scale_ptr,  # [N] fp32, one scale per output row
    y_ptr,  # [M, N] x's dtype, or [SPLIT_K, M, N] fp32 partial sums
    M, N, K,
    stride_xm, stride_wn, stride_ym, stride_ys,
    SPLIT_STEPS,  # steps of BLOCKS blocks each split (program_id 2) covers
    BLOCK_N: tl.constexpr,
    BLOCKS: tl.constexpr,  # 256-weight blocks of a W row per step (64 bytes each)
    PREFETCH: tl.constexpr,  # issue the next step's weight loads before this step's arithmetic
    USE_ASM: tl.constexpr,  # fp16 x on the GPU: one inline-PTX block per word (_TERNARY_WORD_DOT_ASM)
    EVEN: tl.constexpr,  # every split holds whole steps: no load is masked
):
    # One row m of x per program (program_id 1). Rows past N read row N - 1 (never stored): no row masks.
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    rows = tl.minimum(offs_n, N - 1)
    w_rows = w_ptr + rows[:, None, None] * stride_wn  # (BN, 1, 1)
    x_row = x_ptr + m * stride_xm + rows[:, None, None] * 0  # (BN, 1, 1), all the same row of x
    num_blocks = K // 256
    b_start = tl.program_id(2) * SPLIT_STEPS * BLOCKS
    b_end = tl.minimum(b_start + SPLIT_STEPS * BLOCKS, num_blocks)
    acc = tl.zeros((BLOCK_N, BLOCKS, 16), tl.float32)
    p = _ternary_words_loads(w_rows, b_start, b_end, BLOCKS, EVEN)
    for b0 in range(b_start, b_end, BLOCKS):
        b_next = tl.where(b0 + BLOCKS < b_end, b0 + BLOCKS, b_start)  # after the last step: wrap, stay in bounds
        if PREFETCH:  # the next tile is in flight while this one is unpacked and multiplied
            p_next = _ternary_words_loads(w_rows, b_next, b_end, BLOCKS, EVEN)
        acc += _ternary_words_dot(p, x_row, b0, b_end, BLOCKS, USE_ASM, EVEN)
        if PREFETCH:
            p = p_next
        else:
            p = _ternary_words_loads(w_rows, b_next, b_end, BLOCKS, EVEN)
    y = tl.sum(tl.sum(acc, axis=2), axis=1) * tl.load(scale_ptr + rows)  # (BN,)
    tl.store(y_ptr + tl.program_id(2) * stride_ys + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty),
             mask=offs_n < N)


_WORDS_KEYS = {"BLOCK_N", "BLOCK_KB", "SPLIT_K", "PREFETCH", "num_warps", "num_stages"}


def words_config(m: int, n: int, k: int) -> dict:
    """Launch settings of :func:`ternary_matmul_words`: 4 rows a program (n / 4 programs), 1 KB (4096 weights) of
    each row per step: the winner on all three Llama-3-8B shapes at m = 1 in data/bench/quant_matmul_words.json
    (H200; 512 bytes a step, the first guess, came second)."""
    return dict(BLOCK_N=4, BLOCK_KB=1024, SPLIT_K=1, PREFETCH=True, num_warps=4)


def ternary_matmul_words(x: torch.Tensor, packed: torch.Tensor, scale, config: dict | None = None) -> torch.Tensor:
    """out = x @ (scale * T)^T with T stored in the words layout (:func:`pack_ternary_words`): a GEMV, one
    program per (4 rows of W, row of x), for decode (m = 1..4); larger m re-reads the weights once per row of x.

    x: (m, k) fp16/bf16/fp32, k a multiple of 256. Returns (m, n) in x's dtype, accumulated in fp32. fp16 x on
    the GPU runs one PTX block a word; other dtypes (and the interpreter) the same sums in fp32. ``config``
    overrides :func:`words_config` (BLOCK_N, BLOCK_KB: bytes of a row per step, a power of two >= 64, SPLIT_K,
    PREFETCH, num_warps, num_stages).
    """
    scale = _check(x, packed, scale, WORDS_BLOCK)
    m, k = x.shape
    n = packed.shape[0]
    cfg = {**words_config(m, n, k), **(config or {})}
    unknown = set(cfg) - _WORDS_KEYS
    if unknown:
        raise ValueError(f"unknown launch settings {sorted(unknown)}; known: {sorted(_WORDS_KEYS)}")
    block_kb, split_k = cfg["BLOCK_KB"], cfg["SPLIT_K"]
    if block_kb < 64 or block_kb & (block_kb - 1):
        raise ValueError(f"BLOCK_KB must be a power of two >= 64 (one block of 256 weights), got {block_kb}")
    use_asm = x.dtype == torch.float16 and not INTERPRETER
    if x.stride(1) != 1 or (use_asm and (x.stride(0) % 4 or x.data_ptr() % 8)):
        x = x.clone(memory_format=torch.contiguous_format)  # read as int64 (four inputs): 8-byte aligned rows
    packed = packed.contiguous() if packed.data_ptr() % 4 == 0 else packed.clone()
    words = packed.view(torch.int32)  # (N, K // 16)
    blocks = block_kb // 64
    steps = triton.cdiv(triton.cdiv(k // WORDS_BLOCK, blocks), split_k)
    if split_k == 1:
        out, stride_ys = torch.empty((1, m, n), dtype=x.dtype, device=x.device), 0
    else:
        out, stride_ys = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device), m * n
    launch = {key: cfg[key] for key in ("num_warps", "num_stages") if key in cfg and not INTERPRETER}
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), m, split_k)
    _ternary_gemv_words_kernel[grid](x, words, scale, out, m, n, k, x.stride(0), words.stride(0), n, stride_ys, steps,
                                     BLOCK_N=cfg["BLOCK_N"], BLOCKS=blocks, PREFETCH=cfg["PREFETCH"], USE_ASM=use_asm,
                                     EVEN=steps * split_k * blocks == k // WORDS_BLOCK, **launch)
    return out[0] if split_k == 1 else out.sum(0).to(x.dtype)
