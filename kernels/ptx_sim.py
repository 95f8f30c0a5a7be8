"""Run the few PTX instructions of the word kernels' inline asm on the CPU, bit for bit.

What you will learn
- What each instruction of a word block does to the bits (PRMT picks bytes, LOP3 is any 3-input bitwise
  function given by its truth table, f16x2 instructions work on two fp16 lanes of a 32-bit register).
- Why the "magic number" unpacking is exact: run it on every byte or code and compare with the integer.

Inline PTX cannot run in Triton's interpreter, so ``kernels.quant_matmul`` and ``kernels.ternary`` fall back to
fp32 maths there; this simulator checks the PTX text itself (tests/test_quant.py, tests/test_ternary.py).
Only the instructions those blocks use are known; anything else raises ``ValueError`` naming the line::

    registers = {}
    for each line of the block:         op d, a, b, ...;   operands: $n, a register, or an immediate
        registers[d] = op(values of a, b, ...)               # numpy arrays: one element per simulated thread
    return registers["$0"]

fp16 arithmetic is done in float64 (exact for one product plus one addend of fp16 values) and rounded once
to fp16, as ``fma.rn`` does; ``add.f32`` rounds to fp32.
"""
from __future__ import annotations

import re

import numpy as np


def _f16(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float64)


def _bits16(value: np.ndarray) -> np.ndarray:
    return np.asarray(value, dtype=np.float64).astype(np.float16).view(np.uint16).astype(np.uint32)


def _f16x2(fn, *regs: np.ndarray) -> np.ndarray:
    """Apply fn lane-wise to 32-bit registers holding fp16 pairs; one rounding to fp16 per lane."""
    lo = _bits16(fn(*[_f16(r & 0xFFFF) for r in regs]))
    hi = _bits16(fn(*[_f16(r >> 16) for r in regs]))
    return lo | (hi << 16)


def _prmt(a: np.ndarray, b: np.ndarray, sel: int) -> np.ndarray:
    """prmt.b32 default mode: byte i of the result is byte (sel nibble i & 7) of {b, a}; bit 3 replicates its sign."""
    pool = (b.astype(np.uint64) << 32) | a.astype(np.uint64)
    out = np.zeros_like(a, dtype=np.uint64)
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = (pool >> np.uint64(8 * (nib & 7))) & np.uint64(0xFF)
        if nib & 8:
            byte = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        out |= byte << np.uint64(8 * i)
    return out.astype(np.uint32)


def _lop3(a, b, c, lut):
    out = np.zeros_like(a, dtype=np.uint32)
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1).astype(np.uint32) << bit
    return out


def run_ptx(asm: str, inputs: list[np.ndarray], n_outputs: int = 1) -> list[np.ndarray]:
    """Simulate one inline-asm block. ``inputs`` are $n_outputs.. as uint32 ("r") or uint64 ("l") arrays; returns
    the outputs $0.. as arrays (float32 for registers written by f32 instructions, else uint32)."""
    regs: dict[str, np.ndarray] = {f"${n_outputs + i}": np.asarray(v) for i, v in enumerate(inputs)}

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        if re.fullmatch(r"-?(0x[0-9A-Fa-f]+|\d+)", tok):
            return np.uint32(int(tok, 0) & 0xFFFFFFFF)
        raise ValueError(f"unknown operand {tok!r}")

    for raw in asm.splitlines():
        line = raw.strip().rstrip(";").strip()
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, _, rest = line.partition(" ")
        if rest.startswith("{"):  # mov.b64 {a, b}, src  /  mov.b32 {h0, h1}, src: split a register
            names, src = rest[1:].split("}")
            lo_name, hi_name = [n.strip() for n in names.split(",")]
            v = val(src.strip(" ,")).astype(np.uint64)
            width = 32 if op == "mov.b64" else 16
            regs[lo_name] = (v & ((1 << width) - 1)).astype(np.uint32)
            regs[hi_name] = (v >> width).astype(np.uint32)
            continue
        d, *args = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in args]
        if op == "mov.b32":
            regs[d] = np.asarray(a[0])
        elif op == "xor.b32":
            regs[d] = (a[0] ^ a[1]).astype(np.uint32)
        elif op == "shr.b32":
            regs[d] = (a[0] >> a[1]).astype(np.uint32)
        elif op == "prmt.b32":
            regs[d] = _prmt(np.asarray(a[0], np.uint32), np.broadcast_to(np.uint32(a[1]), np.shape(a[0])), int(a[2]))
        elif op == "lop3.b32":
            regs[d] = _lop3(np.asarray(a[0], np.uint32), np.uint32(a[1]), np.uint32(a[2]), int(a[3]))
        elif op == "sub.f16x2":
            regs[d] = _f16x2(lambda x, y: x - y, *a)
        elif op == "mul.f16x2":
            regs[d] = _f16x2(lambda x, y: x * y, *a)
        elif op == "fma.rn.f16x2":
            regs[d] = _f16x2(lambda x, y, z: x * y + z, *a)
        elif op == "cvt.f32.f16":
            regs[d] = _f16(a[0]).astype(np.float32)
        elif op == "add.f32":
            regs[d] = (np.asarray(a[0], np.float32) + np.asarray(a[1], np.float32)).astype(np.float32)
        else:
            raise ValueError(f"ptx_sim does not know {op!r} (line {raw.strip()!r})")
    return [regs[f"${i}"] for i in range(n_outputs)]
