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


def _check(x: torch.Tensor, packed: torch.Tensor, scale) -> torch.Tensor:
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
