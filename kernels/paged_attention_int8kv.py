"""A quantised paged KV cache: int8 (or fp8 e4m3) keys and values with one scale per (token, KV head).

What you will learn
-------------------
* **Quantise on write.** When a token's K (and V) enters the cache, each KV head's ``head_dim``
  values get one scale, ``scale = max|x| / QMAX``, and are stored as ``round(x / scale)`` in one byte
  (QMAX = 127 for int8, 448 for fp8 e4m3). The scale lives beside the block, in a small
  ``[num_blocks, block_size, num_kv_heads]`` fp32 tensor. Bytes per token and head:
  ``head_dim + 4`` instead of ``2 * head_dim`` (fp16).
* **Dequantise for free inside attention.** A per-token scale factors out of both products::

      q . k_t        = q . (ks_t * k8_t)      = ks_t * (q . k8_t)         # scale the score, not the key
      sum_t p_t v_t  = sum_t p_t (vs_t * v8_t) = sum_t (p_t * vs_t) v8_t   # scale the probability

  so the kernel reads 1-byte codes, turns them exactly into fp16 (every int8, and every fp8 e4m3 value
  up to a power of two, is an fp16) for ``tl.dot``, and multiplies one row of BLOCK_N scores (and one
  row of probabilities) by the scales. The loop is otherwise paged-attention v2
  (``kernels/paged_attention.py``): one program per (KV head, sequence), the GQA query group as one
  matrix, online softmax.
* **Half the bytes is not half the time.** Plain int-to-float conversions run on a slow GPU unit, so
  ``_decode_codes`` builds the fp16 values from their bits. Even so, on an H200 this kernel is about as
  fast per step as the fp16 one (data/bench/kv_quant.json): with 1-byte values the work per byte
  (decoding, scaling, arranging tiles for the tensor cores), not memory, sets the pace. The gain it
  delivers is capacity: twice the tokens in the same memory.

Cache-write, one program per new token (all its KV heads)::

    slot = slot_mapping[t];  if slot < 0: skip                  # padding
    x     = k[t]                                                # (num_kv_heads, head_dim)
    scale = max(|x|, over head_dim) / QMAX                      # (num_kv_heads,)
    k_cache[slot] = round(x / scale);  k_scale[slot] = scale    # codes and scales, same slot

Decode, one program per (KV head h, sequence s)::

    Q = q[s, group of h]                                        # (16, D) padded
    for each tile of BLOCK_N tokens:
        K8, ks = k_cache[slots, h], k_scale[slots, h]           # (BLOCK_N, D) codes, (BLOCK_N,) scales
        S = (Q @ K8^T) * ks * softmax_scale                     # dequantise the scores
        online softmax -> P;  acc += (P * vs) @ V8              # dequantise the probabilities
    out = acc / l

The plain-torch references (:func:`quantise_kv_ref`, :func:`cache_write_quant_ref`,
:func:`paged_attention_int8kv_ref`) dequantise the whole cache and reuse ``paged_attention_ref``.
"""
from __future__ import annotations

import torch

import labkit.device  # noqa: F401  (switches Triton to its interpreter when there is no GPU)
import triton
import triton.language as tl

from kernels.paged_attention import LOG2E, paged_attention_ref

# name -> (storage dtype, largest code). fp8 e4m3's largest finite value is 448.
KV_FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
_FORMAT_OF = {dt: name for name, (dt, _) in KV_FORMATS.items()}
SCALE_DTYPE = torch.float32

# The fastest correct launch setting at 3 of the 4 shapes of labkit/bench/kv_quant.py's sweep on an H200
# (its int8_v2_tune rows in data/bench/kv_quant.json): 1-byte tiles want twice the fp16 kernel's tokens a step.
GPU_CONFIG = dict(BLOCK_N=128, num_warps=4, num_stages=3)
CPU_CONFIG = dict(BLOCK_N=16, num_warps=1, num_stages=1)


def kv_format(dtype: torch.dtype) -> str:
    """'int8' or 'fp8' for a cache dtype; a clear error otherwise."""
    if dtype not in _FORMAT_OF:
        raise ValueError(f"a quantised KV cache holds int8 or float8_e4m3fn codes, got {dtype}")
    return _FORMAT_OF[dtype]


# ------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------
def quantise_kv_ref(x: torch.Tensor, kv_format_name: str = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale): x (..., head_dim) -> codes (..., head_dim) int8/fp8 and scale (...,) fp32.

    scale = max|x| / QMAX over the last dim (one per token and KV head); codes = round(x / scale), for
    int8 as floor(y + 0.5) (ties round up), exactly what the kernel does; fp8 rounds to nearest even.
    An all-zero vector gets scale 0 and codes 0.
    """
    if kv_format_name not in KV_FORMATS:
        raise ValueError(f"kv format must be one of {sorted(KV_FORMATS)}, got {kv_format_name!r}")
    qdtype, qmax = KV_FORMATS[kv_format_name]
    x32 = x.float()
    amax = x32.abs().amax(dim=-1)
    # tensor / tensor: IEEE division on every device (torch's CUDA x / python_scalar multiplies by 1 / scalar,
    # which can differ in the last bit from the kernel's correctly rounded division)
    scale = amax / torch.full_like(amax, qmax)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = x32 / safe[..., None]
    if kv_format_name == "int8":
        codes = torch.floor(y + 0.5).clamp(-qmax, qmax).to(qdtype)
    else:
        codes = y.to(qdtype)  # round to nearest even, as the GPU's conversion does
    return codes, scale


def dequantise_kv_ref(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes (..., head_dim) and scale (...,) -> fp32 values."""
    return codes.float() * scale.float()[..., None]


def cache_write_quant_ref(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping):
    """Plain torch, in place: quantise k[t], v[t] and store codes and scales at slot_mapping[t] (>= 0)."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    name = kv_format(k_cache.dtype)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    for x, cache, scales in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        codes, s = quantise_kv_ref(x[keep], name)
        cache.view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = codes
        scales.view(num_blocks * block_size, num_kv_heads)[slots] = s


def paged_attention_int8kv_ref(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, scale=None):
    """Plain torch: dequantise the caches, then ordinary paged decode attention in fp32 (q's dtype out)."""
    k = dequantise_kv_ref(k_cache, k_scale)
    v = dequantise_kv_ref(v_cache, v_scale)
    return paged_attention_ref(q, k, v, block_tables, seq_lens, scale)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _cache_write_quant_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim] fp16 / bf16 / fp32
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim] int8 or fp8 e4m3
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    k_scale_ptr,  # [num_blocks, block_size, num_kv_heads] fp32
    v_scale_ptr,  # [num_blocks, block_size, num_kv_heads] fp32
    slot_mapping_ptr,  # [num_tokens] int32 / int64, -1 = padding
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,  # k_cache and v_cache share strides
    stride_sb, stride_ss,  # k_scale and v_scale share strides; the head stride is 1
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,  # NUM_KV_HEADS rounded up to a power of two
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    QMAX: tl.constexpr,  # 127.0 (int8) or 448.0 (fp8 e4m3)
    IS_FP8: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block_id = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    dst = block_id * stride_cb + offset * stride_cs + h[:, None] * stride_ch + d[None, :]  # (BLOCK_H, BLOCK_D)
    sdst = block_id * stride_sb + offset * stride_ss + h  # (BLOCK_H,)
    for which in tl.static_range(2):  # 0: K, 1: V
        if which == 0:
            x = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask, other=0.0)
        else:
            x = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        # IEEE divisions (div_rn), so codes match the torch reference bit for bit on the GPU too
        # (div_rn does not broadcast: give it operands of one shape)
        scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full([BLOCK_H], QMAX, tl.float32))  # (BLOCK_H,)
        safe = tl.where(scale > 0, scale, 1.0)
        y = tl.math.div_rn(x, tl.broadcast_to(safe[:, None], [BLOCK_H, BLOCK_D]))  # in [-QMAX, QMAX]
        if IS_FP8:
            codes = y.to(tl.float8e4nv)
        else:
            codes = tl.minimum(tl.maximum(tl.floor(y + 0.5), -QMAX), QMAX).to(tl.int8)
        if which == 0:
            tl.store(k_cache_ptr + dst, codes, mask=mask)
            tl.store(k_scale_ptr + sdst, scale, mask=h < NUM_KV_HEADS)
        else:
            tl.store(v_cache_ptr + dst, codes, mask=mask)
            tl.store(v_scale_ptr + sdst, scale, mask=h < NUM_KV_HEADS)


@triton.jit
def _decode_codes(c, IS_FP8: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """uint8 code bits -> DOT_DTYPE values for tl.dot; fp8 codes in fp16 come out 1/256 too small (see UNIT).

    The plain conversions (int -> float, fp8 -> fp16) run on a GPU unit that does 16 a clock per SM:
    about one byte's worth of cache per clock per SM, which is the memory bandwidth itself. So fp16
    values are built from their bits with integer ops and one fp16 subtraction instead:
      int8 c:  bits 0x6400 | (c + 128) are the fp16 1024 + c + 128, so subtract 1152;
      fp8 e4m3: sign to bit 15, the 7 exponent+mantissa bits to bits 13..7 give an fp16 2^-8 times the
               value (fp16's exponent bias is 8 more); the 2^8 goes into the per-token scale instead.
    """
    if DOT_DTYPE == tl.float16:
        c16 = c.to(tl.uint16)
        if IS_FP8:
            return (((c16 & 0x80) << 8) | ((c16 & 0x7F) << 7)).to(tl.float16, bitcast=True)
        else:
            return ((c16 ^ 0x80) | 0x6400).to(tl.float16, bitcast=True) - 1152.0
    else:  # fp32 queries (and tests): exact conversions, speed does not matter here
        if IS_FP8:
            return c.to(tl.float8e4nv, bitcast=True).to(DOT_DTYPE)
        else:
            return c.to(tl.int8, bitcast=True).to(DOT_DTYPE)


@triton.jit
def _paged_decode_quant_kernel(
    out_ptr,  # [num_seqs, num_q_heads, head_dim]
    q_ptr,  # [num_seqs, num_q_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim] int8 or fp8 codes, seen as uint8
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    k_scale_ptr,  # [num_blocks, block_size, num_kv_heads] fp32
    v_scale_ptr,  # [num_blocks, block_size, num_kv_heads] fp32
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32
    qk_scale,  # softmax scale * log2(e)
    stride_qs, stride_qh,
    stride_os, stride_oh,
    stride_cb, stride_cs, stride_ch,
    stride_sb, stride_ss,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # GROUP padded to a power of two >= 16 (tl.dot's minimum)
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,  # tokens per tile
    DOT_DTYPE: tl.constexpr,  # fp16 for fp16 / bf16 queries, fp32 for fp32 queries
    DOT_PRECISION: tl.constexpr,
    IS_FP8: tl.constexpr,  # codes are fp8 e4m3 bits, else int8 bits (both loaded as uint8)
    UNIT: tl.constexpr,  # what _decode_codes' 1.0 is worth: 256 for fp8 codes decoded to fp16, else 1
):
    kvh = tl.program_id(0)
    seq = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    qh = kvh * GROUP + g
    q = tl.load(q_ptr + seq * stride_qs + qh[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    q = q.to(tl.float32).to(DOT_DTYPE)  # (BLOCK_G, D); bf16 queries are multiplied in fp16 (see the wrapper)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt
    for tile in range(0, seq_len, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)
        valid = n < seq_len
        block_id = tl.load(bt_row + n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = block_id * stride_cb + (n % BLOCK_SIZE) * stride_cs + kvh * stride_ch  # (BLOCK_N,)
        srow = block_id * stride_sb + (n % BLOCK_SIZE) * stride_ss + kvh  # (BLOCK_N,)
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0)  # (BLOCK_N, D) 1 byte each
        ks = tl.load(k_scale_ptr + srow, mask=valid, other=0.0)  # (BLOCK_N,)
        k = _decode_codes(k, IS_FP8, DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_G, BLOCK_N) q . codes
        s = s * (ks * (qk_scale * UNIT))[None, :]  # dequantise the scores: one multiply per token
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0)
        vs = tl.load(v_scale_ptr + srow, mask=valid, other=0.0)
        v = _decode_codes(v, IS_FP8, DOT_DTYPE)
        pv = (p * (vs * UNIT)[None, :]).to(DOT_DTYPE)  # dequantise through the probabilities
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_os + qh[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])


# ------------------------------------------------------------------------------------------------
# Wrappers
# ------------------------------------------------------------------------------------------------
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _check_caches(k_cache, v_cache, k_scale, v_scale):
    for name, t in dict(k_cache=k_cache, v_cache=v_cache, k_scale=k_scale, v_scale=v_scale).items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must both be (num_blocks, block_size, num_kv_heads, head_dim), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}.")
    kv_format(k_cache.dtype)
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache and v_cache must share a dtype, got {k_cache.dtype} and {v_cache.dtype}.")
    if k_scale.shape != k_cache.shape[:3] or v_scale.shape != k_cache.shape[:3]:
        raise ValueError(f"k_scale and v_scale must be (num_blocks, block_size, num_kv_heads) = {tuple(k_cache.shape[:3])}, "
                         f"got {tuple(k_scale.shape)} and {tuple(v_scale.shape)}.")
    if k_scale.dtype != SCALE_DTYPE or v_scale.dtype != SCALE_DTYPE:
        raise ValueError(f"scales must be float32, got {k_scale.dtype} and {v_scale.dtype}.")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share strides with a contiguous last dim; call .contiguous().")
    if k_scale.stride() != v_scale.stride() or k_scale.stride(-1) != 1:
        raise ValueError("k_scale and v_scale must share strides with a contiguous last dim; call .contiguous().")


def _check_device(tensors: dict):
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}.")
    device = devices.pop()
    if device.type == "cpu" and not labkit.device.INTERPRETER:
        raise ValueError("the inputs are on the CPU but Triton compiles for the GPU here: move them to 'cuda'.")
    return device


def cache_write_quant(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping):
    """Quantise k, v (num_tokens, num_kv_heads, head_dim) and write codes + scales into the paged cache, in place.

    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim) int8 or float8_e4m3fn;
    k_scale, v_scale: (num_blocks, block_size, num_kv_heads) fp32; slot_mapping: (num_tokens,) int32/int64,
    ``slot = block_id * block_size + offset``, -1 skips a padding token.
    """
    _check_caches(k_cache, v_cache, k_scale, v_scale)
    if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.dim() != 3 or k.shape != v.shape:
        raise ValueError("k and v must both be (num_tokens, num_kv_heads, head_dim) tensors; "
                         "for (B, H, T, D) pass k.transpose(1, 2).reshape(-1, H, D).")
    if k.dtype not in _TL or v.dtype != k.dtype:
        raise ValueError(f"k and v must be fp16/bf16/fp32 of one dtype, got {k.dtype} and {v.dtype}.")
    num_tokens, num_kv_heads, head_dim = k.shape
    num_blocks, block_size = k_cache.shape[:2]
    if k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(f"k has (num_kv_heads, head_dim) = {(num_kv_heads, head_dim)} but the cache has "
                         f"{tuple(k_cache.shape[2:])}.")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("k and v need a contiguous last dim; call .contiguous().")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.shape != (num_tokens,) \
            or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be an int32/int64 ({num_tokens},) tensor.")
    device = _check_device(dict(k=k, v=v, k_cache=k_cache, v_cache=v_cache, k_scale=k_scale, v_scale=v_scale,
                                slot_mapping=slot_mapping))
    if device.type == "cpu" and num_tokens:
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        if lo < -1 or hi >= num_blocks * block_size:
            raise ValueError(f"slot_mapping values must be -1 or in [0, {num_blocks * block_size}), got {lo}..{hi}.")
    if num_tokens == 0:
        return
    name = kv_format(k_cache.dtype)
    if name == "fp8" and labkit.device.INTERPRETER:
        # Seen with triton 3.9's interpreter: fp32 -> fp8e4nv drops the carry into the exponent
        # (126.8 -> 64.0, 1.97 -> 1.0). The GPU's conversion is right; on the CPU use the reference.
        raise NotImplementedError("fp8 cache writes need a GPU: Triton's interpreter converts fp32 to fp8 e4m3 "
                                  "wrongly. On the CPU call cache_write_quant_ref (the decode kernel works).")
    _cache_write_quant_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride()[:3], *k_scale.stride()[:2],
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        QMAX=KV_FORMATS[name][1], IS_FP8=name == "fp8",
        num_warps=1 if num_kv_heads * head_dim <= 256 else 4,
    )


def paged_attention_int8kv(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, scale=None, **launch):
    """Decode attention over a quantised paged KV cache (int8 or fp8 codes + per (token, KV head) scales).

    q: (num_seqs, num_q_heads, head_dim) fp16/bf16/fp32; caches and scales as in :func:`cache_write_quant`;
    block_tables (num_seqs, max_blocks) int32; seq_lens (num_seqs,) int32, each >= 1. ``launch`` overrides
    BLOCK_N / num_warps / num_stages. Returns (num_seqs, num_q_heads, head_dim) in q's dtype.
    """
    _check_caches(k_cache, v_cache, k_scale, v_scale)
    for name, t in dict(q=q, block_tables=block_tables, seq_lens=seq_lens).items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if q.dim() != 3 or q.dtype not in _TL or q.stride(-1) != 1:
        raise ValueError(f"q must be a (num_seqs, num_q_heads, head_dim) fp16/bf16/fp32 tensor with a contiguous "
                         f"last dim, got {tuple(q.shape)} {q.dtype}; for (B, H, 1, D) pass q[:, :, 0].")
    num_seqs, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"q has head_dim {head_dim} but the cache has {cache_dim}.")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 (tl.dot's minimum), got {head_dim}.")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads}).")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.dtype != torch.int32 \
            or block_tables.stride(-1) != 1:
        raise ValueError(f"block_tables must be a contiguous-row int32 ({num_seqs}, max_blocks) tensor, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}.")
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be an int32 ({num_seqs},) tensor, got {tuple(seq_lens.shape)} {seq_lens.dtype}.")
    device = _check_device(dict(q=q, k_cache=k_cache, v_cache=v_cache, k_scale=k_scale, v_scale=v_scale,
                                block_tables=block_tables, seq_lens=seq_lens))
    if device.type == "cpu" and num_seqs:
        capacity = block_tables.shape[1] * block_size
        if int(seq_lens.min()) < 1 or int(seq_lens.max()) > capacity:
            raise ValueError(f"every seq_len must be in [1, {capacity}], got {seq_lens.tolist()}.")
    cfg = {**(GPU_CONFIG if device.type == "cuda" else CPU_CONFIG), **launch}
    if set(cfg) != set(GPU_CONFIG):
        raise ValueError(f"unknown launch settings {sorted(set(cfg) - set(GPU_CONFIG))}; known: {sorted(GPU_CONFIG)}.")
    scale = head_dim**-0.5 if scale is None else float(scale)
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    # fp16 and bf16 queries both multiply in fp16: the codes decode cheaply to fp16 (see _decode_codes), and a
    # query's bf16 value is exact in fp16 unless it lies outside fp16's range (|q| > 65504) or below 6e-5.
    dot_dtype = tl.float32 if q.dtype == torch.float32 else tl.float16
    is_fp8 = kv_format(k_cache.dtype) == "fp8"
    unit = 256.0 if is_fp8 and dot_dtype == tl.float16 else 1.0
    # codes travel as uint8: masked loads need an `other` of the element type, and 0 is a valid uint8
    k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    _paged_decode_quant_kernel[(num_kv_heads, num_seqs)](
        out, q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3], *k_scale.stride()[:2],
        block_tables.stride(0),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_N=cfg["BLOCK_N"], DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        IS_FP8=is_fp8, UNIT=unit, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
