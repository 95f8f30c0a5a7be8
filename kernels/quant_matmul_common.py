"""What both kernel families of :mod:`kernels.quant_matmul` share: input checks, configs, launch helpers.

The int8 kernels (:mod:`kernels.quant_matmul_int8`), the int4 ones (:mod:`kernels.quant_matmul_int4`) and the
swap-AB kernel (:mod:`kernels.quant_matmul_small_m`) read their defaults, dot dtypes, magic numbers and split-k
outputs from here, so neither family imports the other; :mod:`kernels.quant_matmul` re-exports all of it.
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


# ----------------------------------------------------------------------------- wrappers' helpers
def _split(total: int, split_k: int, unit: int) -> int:
    """Length (a multiple of ``unit``) of each of ``split_k`` ranges that together cover ``total``."""
    return triton.cdiv(triton.cdiv(total, split_k), unit) * unit


def _outputs(x: torch.Tensor, n: int, split_k: int):
    """(buffer the kernel writes, its split stride): y itself, or fp32 partial sums that are added afterwards."""
    m = x.shape[0]
    if split_k == 1:
        return torch.empty((1, m, n), dtype=x.dtype, device=x.device), 0
    return torch.empty((split_k, m, n), dtype=torch.float32, device=x.device), m * n
