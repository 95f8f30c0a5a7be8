"""A fused MoE layer: tokens grouped by expert, one grouped matmul launch over all experts (vLLM's fused_moe).

What you will learn
- Why an MoE layer is not E small matmuls: a loop over experts launches E kernels, each too small to fill the
  GPU at decode batch sizes; grouping the (token, expert) pairs by expert lets ONE launch cover every expert.
- The alignment trick (vLLM's ``moe_align_block_size``): sort the pairs by expert and pad each expert's run to
  a multiple of BLOCK_M, so every BLOCK_M block of rows belongs to exactly one expert and the program that
  owns it needs a single weight pointer: ``w + expert_id * stride_e``.
- Where the bytes go at decode: only experts that some token chose are read, so the weight bytes a step
  reads grow with the batch as distinct experts are touched (see :mod:`labkit.moe_amortisation`).

Layout, for N tokens, top-k, E experts, hidden H, expert width I::

    topk_ids (N, k) -> flat pair p = t * k + j, expert topk_ids[t, j]
    align:  sorted_ids = [ pairs of expert 0 | pad | pairs of expert 1 | pad | ... ]   pad = N * k (no pair)
            block_expert[b] = the expert of rows b*BLOCK_M .. (b+1)*BLOCK_M - 1       (-1: an empty block)

Blocked algorithm (one launch per matmul; grid = (row blocks, N tiles))::

    program (b, n):  e = block_expert[b];  rows = sorted_ids[b*BM : (b+1)*BM];  valid = rows < N * k
        a rows:  x[rows // k]        (first matmul: each token is read once per chosen expert)
                 h[rows]             (second matmul: the pair's own activation)
        acc = sum over K tiles of  A[rows, k-tile] @ W[e, n-tile, k-tile]^T                     tl.dot
        first matmul, FUSE_SWIGLU:  two accumulators, gate = W13[e, n] and up = W13[e, I + n];
                                    h[rows, n] = silu(gate) * up
        second matmul:              y[rows, n] = acc * topk_weight[rows]
    out[t] = sum_j y[t * k + j]                                                 (torch, k rows per token)

A pair with expert id -1 is skipped (a token a full expert dropped): it lands in no block and its y row is 0.
"""
from __future__ import annotations

import torch

import labkit.device  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
import triton
import triton.language as tl

from labkit.device import INTERPRETER

DEFAULT_BLOCKS = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)


# ----------------------------------------------------------------------------- alignment (torch)
def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Group (token, expert) pairs by expert, each expert's run padded to a multiple of ``block_m``.

    Returns (sorted_ids (P,) int32 with pad value N*k, block_expert (P // block_m,) int32, counts (E,)): the
    pairs of expert e, in token order, fill whole blocks whose ``block_expert`` is e; blocks past the last run
    have expert -1 and exit at once. P is the worst case, N*k + E*(block_m - 1) rounded up to block_m, so
    nothing here waits for the GPU (no host sync: the whole MoE layer can be captured in a CUDA graph).
    Experts with no pair get no block, so their weights are never read."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be (tokens, top_k), got shape {tuple(topk_ids.shape)}")
    flat = topk_ids.reshape(-1).to(torch.int64)  # (N * k,)
    if flat.device.type == "cpu":
        if flat.numel() and int(flat.max()) >= num_experts:
            raise ValueError(f"topk_ids holds expert {int(flat.max())} but there are {num_experts} experts")
    else:  # checked on the device, without waiting for it
        torch._assert_async((flat < num_experts).all(), "topk_ids holds an expert id >= num_experts")
    dev, n_pairs = flat.device, flat.numel()
    key = torch.where(flat >= 0, flat, num_experts)  # -1 (a dropped pair) sorts last, into no block
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts + block_m - 1) // block_m * block_m  # (E + 1,) rows each expert's run takes
    padded[num_experts] = 0
    ends = torch.cumsum(padded, 0)  # (E + 1,)
    max_rows = triton.cdiv(n_pairs + num_experts * (block_m - 1), block_m) * block_m
    order = torch.argsort(key, stable=True)  # pairs by expert, token order inside an expert
    expert_of = key[order]
    rank = torch.arange(n_pairs, device=dev) - (torch.cumsum(counts, 0) - counts)[expert_of]
    dest = torch.where(expert_of < num_experts, ends[expert_of] - padded[expert_of] + rank, max_rows)
    sorted_ids = torch.full((max_rows + 1,), n_pairs, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)  # dropped pairs land on the extra last slot, cut off below
    block_start = torch.arange(0, max_rows, block_m, device=dev)
    block_expert = torch.searchsorted(ends[:num_experts].contiguous(), block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_ids[:max_rows], block_expert.to(torch.int32), counts[:num_experts]


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _grouped_matmul_kernel(
    a_ptr,  # [rows of A, K]: tokens x (A_PER_TOKEN) or pair activations h, unit stride along K
    w_ptr,  # [E, W_ROWS, K] expert weights (nn.Linear layout: out features x in features)
    c_ptr,  # [N * k, N_OUT] one row per (token, expert) pair
    topk_w_ptr,  # [N * k] routing weight of each pair (read if MUL_ROUTED_WEIGHT)
    sorted_ids_ptr,  # [num_rows] pair ids grouped by expert; N * k = padding
    block_expert_ptr,  # [num_rows // BLOCK_M] the expert of each block of rows; -1 = no expert
    num_pairs, N_OUT, K, top_k,
    stride_am, stride_we, stride_wn, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_PER_TOKEN: tl.constexpr,  # A's row of pair p is p // top_k (the token), else p
    FUSE_SWIGLU: tl.constexpr,  # W holds [gate; up] (2 * N_OUT rows): store silu(gate) * up
    MUL_ROUTED_WEIGHT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)  # (BM,) which (token, expert) pair each row is
    valid = pair < num_pairs
    if A_PER_TOKEN:
        a_row = pair // top_k  # the token of the pair (padding rows point one past the end, masked)
    else:
        a_row = pair
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output columns
    mask_n = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :]  # (BM, BK)
    w_base = w_ptr + expert.to(tl.int64) * stride_we  # the one weight pointer this block needs
    w_ptrs = w_base + offs_n[None, :] * stride_wn + offs_k[:, None]  # (BK, BN): W[e, n, k] transposed
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if FUSE_SWIGLU:
        up_ptrs = w_ptrs + N_OUT * stride_wn  # the up rows sit N_OUT rows below the gate rows
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if FUSE_SWIGLU:
            u = tl.load(up_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
            acc_up = tl.dot(a, u, acc_up, input_precision=DOT_PRECISION)
            up_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if FUSE_SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up  # silu(gate) * up, in fp32
    if MUL_ROUTED_WEIGHT:
        acc = acc * tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + pair[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _dot_types(x: torch.Tensor):
    if INTERPRETER:  # the interpreter's dot runs in numpy; fp32 avoids its raw-bits bf16
        return tl.float32, "ieee"
    return _TL[x.dtype], ("ieee" if x.dtype == torch.float32 else "tf32")


def grouped_matmul(a, w, sorted_ids, block_expert, num_pairs: int, top_k: int, *, a_per_token: bool,
                   swiglu: bool = False, topk_weights: torch.Tensor | None = None, blocks: dict | None = None):
    """C[p] = A[row(p)] @ W[expert(p)]^T for every aligned pair p, in one launch (see the module docstring).

    a (rows, K); w (E, W_ROWS, K). With ``swiglu`` W_ROWS = 2 * n_out and C = silu(gate) * up. Returns
    (num_pairs, n_out) in a's dtype; rows of skipped pairs are 0."""
    cfg = {**DEFAULT_BLOCKS, **(blocks or {})}
    n_out = w.shape[1] // 2 if swiglu else w.shape[1]
    c = torch.zeros(num_pairs, n_out, dtype=a.dtype, device=a.device)
    if num_pairs == 0:
        return c
    dot_dtype, precision = _dot_types(a)
    grid = (sorted_ids.numel() // cfg["BLOCK_M"], triton.cdiv(n_out, cfg["BLOCK_N"]))
    _grouped_matmul_kernel[grid](
        a, w, c, topk_weights if topk_weights is not None else c, sorted_ids, block_expert,
        num_pairs, n_out, a.shape[1], top_k, a.stride(0), w.stride(0), w.stride(1), c.stride(0),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], A_PER_TOKEN=a_per_token,
        FUSE_SWIGLU=swiglu, MUL_ROUTED_WEIGHT=topk_weights is not None, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        **{k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")})
    return c


def _check(x, w13, w2, topk_ids, topk_weights, dtypes=tuple(_TL)):
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expected x (N, H), w13 (E, 2I, H), w2 (E, H, I); got {tuple(x.shape)}, "
                         f"{tuple(w13.shape)}, {tuple(w2.shape)}")
    n, h = x.shape
    e, two_i, h13 = w13.shape
    if h13 != h or two_i % 2 or tuple(w2.shape) != (e, h, two_i // 2):
        raise ValueError(f"shapes disagree: x (N, H={h}), w13 {tuple(w13.shape)} should be (E, 2I, {h}), "
                         f"w2 {tuple(w2.shape)} should be ({e}, {h}, {two_i // 2})")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != n:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must both "
                         f"be (N={n}, top_k)")
    if x.dtype not in dtypes or w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"x, w13, w2 must share one float dtype (fp16 / bf16 / fp32); got {x.dtype}, "
                         f"{w13.dtype}, {w2.dtype}")
    if len({x.device, w13.device, w2.device, topk_ids.device}) != 1:
        raise ValueError("x, w13, w2 and topk_ids must be on one device")
    return x.contiguous(), w13.contiguous(), w2.contiguous()


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor, *, blocks: dict | None = None) -> torch.Tensor:
    """An MoE layer's experts: out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]).

    x (N, H); w13 (E, 2I, H) = [w1 (gate); w3 (up)] per expert; w2 (E, H, I); topk_ids (N, k) int (-1: skip);
    topk_weights (N, k). Two launches: gate/up with SwiGLU fused, then down with the routing weight."""
    x, w13, w2 = _check(x, w13, w2, topk_ids, topk_weights)
    n, k = topk_ids.shape
    cfg = {**DEFAULT_BLOCKS, **(blocks or {})}
    sorted_ids, block_expert, _ = moe_align_block_size(topk_ids, w13.shape[0], cfg["BLOCK_M"])
    weights = topk_weights.reshape(-1).float().contiguous()
    h = grouped_matmul(x, w13, sorted_ids, block_expert, n * k, k, a_per_token=True, swiglu=True, blocks=cfg)
    y = grouped_matmul(h, w2, sorted_ids, block_expert, n * k, k, a_per_token=False, topk_weights=weights, blocks=cfg)
    return y.view(n, k, -1).sum(1, dtype=torch.float32).to(x.dtype)  # (N, H)


def fused_moe_ref(x, w13, w2, topk_ids, topk_weights, *, blocks=None) -> torch.Tensor:
    """Plain-torch :func:`fused_moe`: a loop over experts, each on the tokens that chose it (fp32 maths)."""
    x, w13, w2 = _check(x, w13, w2, topk_ids, topk_weights, dtypes=(*_TL, torch.float64))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    inter = w2.shape[2]
    for e in range(w13.shape[0]):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        gu = x[tok].to(acc) @ w13[e].to(acc).T  # (n_e, 2I)
        h = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
        out.index_add_(0, tok, (h @ w2[e].to(acc).T) * topk_weights[tok, slot, None].to(acc))
    return out.to(x.dtype)
