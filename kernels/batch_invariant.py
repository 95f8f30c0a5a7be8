"""Batch-invariant kernels: each row's result does not depend on how many other rows share the launch.

What you will learn
-------------------
* **Why a batch changes a row's numbers.** Floating-point addition is not associative: ``(a + b) + c`` and
  ``a + (b + c)`` can differ in the last bit. A library kernel picks its tiling from the shapes it is given:
  cuBLAS chooses a different tile (and may split K across thread blocks, "split-K") for M = 1 than for M = 64;
  torch's reductions pick a strategy from the number of rows; labkit's decode attention
  (kernels/paged_attention.py) splits each context into a number of partitions chosen from the batch size. Each
  choice is right and fast, but it changes the order in which a row's products are summed, so the same request
  gets different logits alone and in a batch; greedy decoding then flips a near-tie and the texts diverge
  (Thinking Machines, "Defeating Nondeterminism in LLM Inference", 2025).
* **The fix is one fixed reduction order per row**, chosen from nothing but the row's own length:

      matmul     one tile config for every M, no split-K: row m of x @ w.T is the same K loop whatever M is
      RMSNorm    one program per row, the row's sum of squares in BLOCK-wide pieces from column 0
      attention  one program per (query, KV head), keys in tiles of a FIXED size from position 0, online
                 softmax: a query at position p sums the same tiles in the same order whether it is a decode
                 among 1 or 256, or row 37 of a prompt chunked in 16s or fed whole

  It costs speed: a fixed tile is wasted on small M (decode), and a context is no longer split to fill the GPU.

The blocked algorithms (m a row, n an output column, p a query's position)::

    matmul:     for each (tile of rows, tile of columns) in parallel:       # BLOCK_M, BLOCK_N, BLOCK_K fixed
                    acc = 0
                    for k0 in range(0, K, BLOCK_K): acc += x[rows, k0:k0+BLOCK_K] @ w[cols, k0:k0+BLOCK_K].T
                    out[rows, cols] = acc (+ bias)
    rms_norm:   for each row in parallel:
                    ss = 0;  for h0 in range(0, H, BLOCK): ss += x[row, h0:h0+BLOCK] ** 2   (BLOCK lanes)
                    out[row] = w * (x[row] / sqrt(sum(ss) / H + eps))
    attention:  for each (sequence s, query i of s, KV head h) in parallel:
                    p = seq_len[s] - q_len[s] + i;  m = -inf; l = 0; acc = 0
                    for start in range(0, p + 1, KV_SPLIT):                          # the same tiles for every p
                        K, V = cache[block_tables[s, n // block_size], n % block_size, h]   n = start + arange
                        S = q[group heads] . K * scale, -inf where n > p
                        m_new = max(m, max(S)); P = exp(S - m_new); alpha = exp(m - m_new)
                        l = alpha * l + sum(P); acc = alpha * acc + P @ V; m = m_new
                    out = acc / l

The torch references (``*_ref``) compute the same values in float32/float64 for the tests; they are not
themselves batch-invariant on a GPU (that is the point). tests/test_batch_invariance.py checks each kernel
against its reference and that a row's output is bitwise the same alone and among others.
"""
from __future__ import annotations

import torch

import labkit.device  # noqa: F401  (switches Triton to its interpreter when there is no GPU)
import triton
import triton.language as tl
from kernels.prefill_attention import _check_inputs as _check_attention_inputs
from kernels.fused_ops import rms_norm_ref  # noqa: F401  (labkit.model.RMSNorm's formula, this kernel's reference)
from kernels.prefill_attention import paged_prefill_attention_ref

# ONE launch config per dtype for every M: that is the whole trick. (fp32 tiles are smaller: registers.)
# The interpreter's cost grows with the elements per op, hence small tiles there; it runs on numpy, whose
# per-row results do not depend on M either.
MATMUL_GPU = {True: dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),  # fp32
              False: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)}  # fp16 / bf16
MATMUL_CPU = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1)
RMS_BLOCK = 1024  # columns per piece of a row's sum of squares (the interpreter: 64)
KV_SPLIT = 32  # keys per attention tile: a fixed SIZE, never a fixed number of splits
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------------
# References (plain torch)
# ------------------------------------------------------------------------------------------------
def matmul_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ weight (N, K).T (+ bias) in float64, returned in x's dtype."""
    out = x.double() @ weight.double().T
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)


def attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=None):
    """Causal attention over the paged cache, plain float32 torch (kernels/prefill_attention.py's reference)."""
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M"])  # one compiled kernel whatever M is (Triton would specialise M % 16 == 0)
def _matmul_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K] (nn.Linear's weight, rows are output features)
    b_ptr,  # [N] bias (unread when HAS_BIAS is False)
    out_ptr,  # [M, N]
    M, N, K,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (BLOCK_M rows, BLOCK_N columns); the full K loop in one program (no split-K)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + rn[None, :].to(tl.int64) * stride_wn + kk[:, None],
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [M, H]
    w_ptr,  # [H]
    out_ptr,  # [M, H]
    H, stride_x, stride_o, eps,
    BLOCK: tl.constexpr,
):
    """One program per row: the row's sum of squares in BLOCK lanes from column 0, then one tree sum."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ss = tl.zeros([BLOCK], dtype=tl.float32)
    for h0 in range(0, H, BLOCK):
        x = tl.load(x_ptr + row * stride_x + h0 + cols, mask=h0 + cols < H, other=0.0).to(tl.float32)
        ss += x * x
    rstd = 1.0 / tl.sqrt_rn(tl.sum(ss, axis=0) / H + eps)
    for h0 in range(0, H, BLOCK):
        live = h0 + cols < H
        x = tl.load(x_ptr + row * stride_x + h0 + cols, mask=live, other=0.0)
        w = tl.load(w_ptr + h0 + cols, mask=live, other=0.0)
        y = (x.to(tl.float32) * rstd).to(x.dtype)  # as the model: normalise in fp32, scale in its dtype
        tl.store(out_ptr + row * stride_o + h0 + cols, (w * y).to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _attention_kernel(
    out_ptr,  # [num_tokens, num_q_heads, head_dim]
    q_ptr,  # [num_tokens, num_q_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32, cached prefix + new tokens
    scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch,  # k_cache and v_cache share strides
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    KV_SPLIT: tl.constexpr,  # keys per tile
):
    """One program per (sequence, query of it, KV head): the group's query heads against keys 0..p."""
    seq = tl.program_id(0)
    i = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if i >= q_len:  # the grid is (num_seqs, max_query_len, Hkv): shorter runs leave spare programs
        return
    p = tl.load(seq_lens_ptr + seq) - q_len + i  # this query's absolute position
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    g_ok = g < GROUP
    row = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + row * stride_qt + (kvh * GROUP + g)[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None], other=0.0).to(tl.float32)  # (GROUP_PAD, D)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for start in range(0, p + 1, KV_SPLIT):  # tile 0 always holds key 0, so m_i is finite after it
        n = start + tl.arange(0, KV_SPLIT)
        live = n <= p  # masked loads: slots past p may hold another step's keys or garbage (even NaN)
        block_id = tl.load(bt_row + n // BLOCK_SIZE, mask=live, other=0)
        kv_off = block_id.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kvh * stride_ch  # (KV_SPLIT,)
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (GROUP_PAD, KV_SPLIT), fp32 FMAs
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        pr = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, axis=1)
        acc = acc * alpha[:, None] + tl.sum(pr[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
    out = out_ptr + row * stride_ot + (kvh * GROUP + g)[:, None] * stride_oh + d[None, :]
    tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


# ------------------------------------------------------------------------------------------------
# Wrappers
# ------------------------------------------------------------------------------------------------
def _check_float(name: str, t, dim: int, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, the input on {device}: move them to one device")


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, **launch) -> torch.Tensor:
    """Batch-invariant ``x @ weight.T + bias``: x (M, K), weight (N, K) as nn.Linear holds it, bias (N,).

    The tile config depends only on the dtype, so row m's output is bitwise the same for every M."""
    _check_float("x", x, 2)
    _check_float("weight", weight, 2, x.device)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} input features, weight {tuple(weight.shape)} expects {weight.shape[1]}")
    if weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype}, weight {weight.dtype}: cast one of them")
    if bias is not None:
        _check_float("bias", bias, 1, x.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries, weight {weight.shape[0]} output features")
    x, weight = x.contiguous(), weight.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    fp32 = x.dtype == torch.float32
    cfg = {**(MATMUL_GPU[fp32] if x.is_cuda else MATMUL_CPU), **launch}
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _matmul_kernel[grid](x, weight, bias if bias is not None else x, out, M, N, K,
                         x.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                         DOT_PRECISION="ieee" if fp32 else "tf32", **cfg)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, block: int | None = None) -> torch.Tensor:
    """Batch-invariant RMSNorm of each row of x (M, H) with weight (H,): one program per row."""
    _check_float("x", x, 2)
    _check_float("weight", weight, 1, x.device)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"x rows have {x.shape[1]} features, weight {weight.shape[0]}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = block or (RMS_BLOCK if x.is_cuda else 64)
    _rms_norm_kernel[(x.shape[0],)](x, weight, out, x.shape[1], x.stride(0), out.stride(0), float(eps), BLOCK=block,
                                    num_warps=4 if x.is_cuda else 1)
    return out


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_query_len: int,
                    scale=None, kv_split: int = KV_SPLIT) -> torch.Tensor:
    """Batch-invariant causal attention for a packed varlen step (prefill chunks and decodes alike).

    Same arguments as kernels/prefill_attention.paged_prefill_attention, plus ``max_query_len`` (a host int:
    the grid's second axis, so the launch never reads a length back and can sit in a CUDA graph)."""
    _check_attention_inputs(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens)
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, int) or max_query_len < 1:
        raise ValueError(f"max_query_len must be an integer >= 1 (the longest run of new tokens), "
                         f"got {max_query_len!r}")
    if kv_split < 16 or kv_split & (kv_split - 1):
        raise ValueError(f"kv_split must be a power of two >= 16, got {kv_split}")
    N, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    group = Hq // Hkv
    out = torch.empty_like(q)
    scale = D ** -0.5 if scale is None else scale
    grid = (seq_lens.shape[0], max_query_len, Hkv)
    _attention_kernel[grid](out, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, float(scale),
                            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
                            GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_DIM=D,
                            BLOCK_SIZE=k_cache.shape[1], KV_SPLIT=kv_split, num_warps=4 if q.is_cuda else 1)
    return out
