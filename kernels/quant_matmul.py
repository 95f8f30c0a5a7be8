"""Weight-only int8 / int4 matmul: the weights stay packed in memory and are dequantised in registers.

What you will learn
- Why batch-1 decode is a weight-streaming problem: every weight byte is read once per step, so
  4-bit weights can make a matmul up to ~4x faster than 16-bit ones (bytes, not FLOPs, set the time).
- How a kernel unpacks two 4-bit codes from a byte (mask, shift), subtracts the group's zero point,
  multiplies by its scale, and never writes the dequantised weight anywhere.
- Two shapes of the same computation: a GEMV path (few rows of x; CUDA-core multiply-adds, many
  programs along n so the whole chip streams the weight) and a GEMM path (``tl.dot`` on tensor cores).

Where it lives (this module is the entry point: import from here, it re-exports every name of the files below)
- :mod:`kernels.quant_matmul_int8`: int8 weights, one scale a row: GEMV, WORDS GEMV and GEMM kernels, ``int8_matmul``.
- :mod:`kernels.quant_matmul_int4`: int4 weights in groups: ``pack_int4`` / ``unpack_int4`` (the packing inside a
  group), GEMV, WORDS GEMV and GEMM kernels, ``int4_matmul``, and the float-minimum variant ``int4_fmin_matmul``.
- :mod:`kernels.quant_matmul_small_m`: int4 at 2 <= m <= 16, the swap-AB kernel (``path="small_m"``).
- :mod:`kernels.quant_matmul_common`: what they share: ``default_config``, the input checks, ``_magic``, split-k.

Layouts (written by :mod:`labkit.quant`, read here; ``pack_int4`` / ``unpack_int4`` define int4's)::

    int8:  qweight [N, K]  int8, w[n, k] ~= qweight[n, k] * scales[n]            (per output channel)
    int4:  qweight [N, KP // 2] uint8, scales / zeros [N, KP // G]   (KP = K rounded up to G)
           w[n, k] ~= (q[n, k] - zeros[n, k // G]) * scales[n, k // G]          (per group of G along k)

Tricks both families use, each a constexpr so the plain version stays next to it (each file lists its own):
- ``MAGIC``: ``0x4B000000 | q`` read as fp32 is exactly 2**23 + q, so one OR and one subtract replace
  an int-to-float conversion (which runs at a quarter of the rate of adds). The GEMM path does the same
  in 16 bits (0x6400 | q is 1024 + q in fp16).
- Pointer tensors of the weight tile's shape for x (every row of the tile points at the same inputs):
  Triton gives loads of one shape one register layout, so the loop never reshuffles x through shared
  memory (an earlier version did, three times a step).
- ``SPLIT_K``: more programs along k, whose fp32 partial sums torch adds afterwards (an extra launch).
"""
from __future__ import annotations

# Re-exported: labkit, the benchmarks, the notebooks and the tests import these names from kernels.quant_matmul.
from kernels.quant_matmul_common import (  # noqa: F401
    GEMV_MAX_M, INT8_GEMV_CONFIG, SMALL_M_MAX, SUPPORTED_GROUPS, _FLOATS, _TL, _check_x, _default_for, _dot_types,
    _launch_options, _magic, _outputs, _split, default_config)
from kernels.quant_matmul_int4 import (  # noqa: F401
    _INT4_TO_FP16_ASM, _INT4_WORD_DOT_ASM, _check_int4, _check_int4_fmin, _group_sums, _int4_gemm_kernel,
    _int4_gemv_kernel, _int4_gemv_loads, _int4_gemv_words_kernel, _int4_words_dot, _int4_words_loads, dequantize_int4,
    dequantize_int4_fmin, int4_fmin_matmul, int4_fmin_matmul_ref, int4_matmul, int4_matmul_ref, pack_int4, unpack_int4)
from kernels.quant_matmul_int8 import (  # noqa: F401
    _INT8_WORD_DOT_ASM, _check_int8, _int8_gemm_kernel, _int8_gemv_kernel, _int8_gemv_loads, _int8_gemv_words_kernel,
    _int8_words_dot, _int8_words_launch, _int8_words_loads, dequantize_int8, int8_matmul, int8_matmul_ref)
