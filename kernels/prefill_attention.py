"""Causal prefill attention over a paged KV cache, for a packed batch of variable-length query runs.

What you will learn
-------------------
* **Varlen packing**: one step's new tokens from every sequence sit in one (num_tokens, Hq, D) tensor; rows
  ``cu_seqlens_q[s] : cu_seqlens_q[s + 1]`` are sequence s's. A prompt chunk, the uncached suffix of a
  prefix-cache hit and a decode row (one token) are the same thing here: a run of queries at the end of a
  sequence whose keys and values (cached prefix and new tokens alike) are already in the paged cache::

      key positions  0 ..................... prefix-1 | prefix ................ seq_len-1
                     |       cached prefix            |  new: q_len = cu[s+1] - cu[s]  |
      query i of sequence s sits at position prefix + i and sees keys 0 .. prefix + i

* **FlashAttention on paged keys**: a program owns a tile of queries, walks the keys in tiles gathered
  through the block table (as in kernels/paged_attention.py) with the same online softmax, masks by absolute
  position, and stops at the last key its last query needs: about half the score matrix is never computed.
* **GQA stacking**: the ``group = Hq // Hkv`` query heads sharing a KV head are stacked with the tile's
  tokens into one (BLOCK_M * group, D) matrix, so ``tl.dot`` gets >= 16 rows even for a decode row.
* **A grid from shapes alone**: sequence s is given ``cu[s+1] // BLOCK_M - cu[s] // BLOCK_M + 1`` tiles
  (always >= its ceil(q_len / BLOCK_M)), so the flat tile count is ``num_tokens // BLOCK_M + num_seqs``,
  whatever the lengths. Each program finds its sequence by a binary search over cu_seqlens_q (vLLM's Triton
  unified attention does the same). The host never reads a length, so the launch never waits for the GPU and
  can be captured in a CUDA graph and replayed with other lengths; spare tiles (at most one a sequence) exit.

The blocked algorithm (r indexes the BLOCK_M * group stacked rows)::

    for each (query tile t, kv head h) in parallel:
        s     = last sequence with cu[s] // BLOCK_M + s <= t           # binary search over cu_seqlens_q
        i0    = (t - cu[s] // BLOCK_M - s) * BLOCK_M                   # the tile's first query within s
        if i0 >= q_len[s]: return                                      # a spare tile
        Q     = q[cu[s] + i0 + r // group, h * group + r % group, :]   # (BLOCK_M * group, D)
        pos   = prefix[s] + i0 + r // group                            # each row's absolute position
        end   = prefix[s] + min(q_len[s], i0 + BLOCK_M)                # one past the last key any row sees
        m = -inf; l = 0; acc = 0
        for start in range(0, end, BLOCK_N):
            n    = start + arange(BLOCK_N)
            K, V = cache[block_tables[s, n // block_size], n % block_size, h, :]    # (BLOCK_N, D) gathers
            S    = (Q @ K^T) * scale, -inf where n > pos                             # causal by position
            m_new = max(m, rowmax(S)); P = exp(S - m_new); alpha = exp(m - m_new)
            l = alpha * l + rowsum(P); acc = alpha * acc + P @ V; m = m_new
        out[rows of the tile] = acc / l

:func:`paged_prefill_attention_ref` gathers each sequence's blocks and runs plain causal attention in float32;
tests/test_prefill_attention.py checks the kernel against it and it against a float64 dense attention.
"""
from __future__ import annotations

import torch

import labkit.device  # noqa: F401  (switches Triton to its interpreter when there is no GPU)
import triton
import triton.language as tl
from kernels.paged_attention import gather_kv
from labkit.attention import attention_ref

LOG2E = 1.4426950408889634  # the kernel uses exp2: exp(x) = exp2(x * log2(e))

# BLOCK_ROWS: rows of the stacked (query token x group head) matrix a program owns, so a tile holds
# BLOCK_M = BLOCK_ROWS // group query tokens. The fp16/bf16 tiles are FlashAttention's usual 128 x 64 for
# D <= 128; the others are the largest that ptxas (sm_90a) builds without spilling registers: fp32 tiles and
# D = 256 need more of them. Not yet timed on an H200. The interpreter ignores num_warps / num_stages, and its
# cost grows with the elements per op, hence tiny tiles there.
GPU_CONFIG = {  # (dtype is fp32, head_dim > 128) -> launch settings
    (False, False): dict(BLOCK_ROWS=128, BLOCK_N=64, num_warps=8, num_stages=3),
    (False, True): dict(BLOCK_ROWS=64, BLOCK_N=32, num_warps=8, num_stages=3),
    (True, False): dict(BLOCK_ROWS=32, BLOCK_N=32, num_warps=4, num_stages=2),
    (True, True): dict(BLOCK_ROWS=16, BLOCK_N=16, num_warps=4, num_stages=2),
}
CPU_CONFIG = dict(BLOCK_ROWS=16, BLOCK_N=16, num_warps=1, num_stages=1)


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------
def paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=None):
    """Plain torch: gather each sequence's blocks into contiguous K/V, then causal attention in fp32.

    Same arguments as :func:`paged_prefill_attention`; returns (num_tokens, num_q_heads, head_dim) in q's dtype.
    """
    out = torch.empty_like(q)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q_s = q[cu[s] : cu[s + 1]]  # (Tq, Hq, D)
        if not len(q_s):
            continue
        k = gather_kv(k_cache, block_tables[s], seq_len).transpose(0, 1)[None]  # (1, Hkv, L, D)
        v = gather_kv(v_cache, block_tables[s], seq_len).transpose(0, 1)[None]
        pos = torch.arange(seq_len, device=q.device)[None]  # (1, L); the new queries are the last Tq positions
        o = attention_ref(q_s.transpose(0, 1)[None], k, v, q_pos=pos[:, seq_len - len(q_s) :], k_pos=pos, scale=scale)
        out[cu[s] : cu[s + 1]] = o[0].transpose(0, 1)  # (1, Hq, Tq, D) -> (Tq, Hq, D)
    return out


# ------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------
@triton.jit
def _find_seq(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_M: tl.constexpr):
    """The last sequence s whose first tile, cu[s] // BLOCK_M + s, is <= tile (first tiles strictly increase)."""
    lo = 0  # first_tile(0) = 0 <= tile, so the answer lies in [lo, hi]
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(cu_seqlens_q_ptr + mid) // BLOCK_M + mid <= tile:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _paged_prefill_attention_kernel(
    out_ptr,  # [num_tokens, num_q_heads, head_dim]
    q_ptr,  # [num_tokens, num_q_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32, cached prefix + new tokens
    qk_scale,  # softmax scale * log2(e)
    num_seqs,
    stride_qt, stride_qh,
    stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch,  # k_cache and v_cache share strides
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_M: tl.constexpr,  # query tokens per tile, BLOCK_M * GROUP <= BLOCK_ROWS
    BLOCK_ROWS: tl.constexpr,  # stacked rows, a power of two >= 16 (tl.dot's minimum on the GPU)
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per tile
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # the interpreter's tl.dot misreads bf16 (it holds it as raw bits): upcast there
):
    """One program per (query tile, KV head): the tile's tokens x the group's heads against causal keys."""
    # Reversed: a sequence's last tiles see the most keys, so they start first and short tiles fill the tail.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    seq = _find_seq(cu_seqlens_q_ptr, tile, num_seqs, BLOCK_M)
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    i0 = (tile - q_start // BLOCK_M - seq) * BLOCK_M
    if i0 >= q_len:  # a spare tile (the grid is sized from shapes, not lengths), or q_len == 0
        return
    prefix = tl.load(seq_lens_ptr + seq) - q_len
    r = tl.arange(0, BLOCK_ROWS)
    i = i0 + r // GROUP  # (BLOCK_ROWS,) query index within the sequence; the group's heads are adjacent rows
    qh = kvh * GROUP + r % GROUP  # query head of each row
    row_ok = (r < BLOCK_M * GROUP) & (i < q_len)
    pos = prefix + i  # absolute position of each row's token
    d = tl.arange(0, HEAD_DIM)
    q_off = (q_start + i).to(tl.int64)[:, None] * stride_qt + qh[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)  # (BLOCK_ROWS, D)
    if DOT_IN_FP32:
        q = q.to(tl.float32)
    end = prefix + tl.minimum(q_len, i0 + BLOCK_M)  # <= seq_len: slots past the sequence are never loaded
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_ROWS], float("-inf"), dtype=tl.float32)  # running max (log2 units)
    l_i = tl.zeros([BLOCK_ROWS], dtype=tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_ROWS, HEAD_DIM], dtype=tl.float32)  # running sum of exp2(score - m_i) * v
    for start in range(0, end, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)  # logical key positions
        live = n < end  # masked loads: unused block-table entries and slots may hold garbage (even NaN)
        block_id = tl.load(bt_row + n // BLOCK_SIZE, mask=live, other=0)
        kv_off = block_id.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kvh * stride_ch  # (BLOCK_N,)
        k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=live[:, None], other=0.0)  # (BLOCK_N, D)
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=live[:, None], other=0.0)  # (BLOCK_N, D)
        if DOT_IN_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_ROWS, BLOCK_N) fp32
        # Causal: row sees n <= pos, which also drops n >= end for every stored row. Rows not stored may see
        # n >= end, but those keys loaded as zeros and every row sees key 0, so no row's max stays -inf (NaN).
        s = tl.where(n[None, :] <= pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out_off = (q_start + i).to(tl.int64)[:, None] * stride_ot + qh[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + out_off, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------------
# Wrapper
# ------------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens):
    """Shapes, dtypes, devices and strides: metadata only, so no sync."""
    tensors = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, cu_seqlens_q=cu_seqlens_q,
                   seq_lens=seq_lens)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if q.dim() != 3:
        raise ValueError(f"q must be (num_tokens, num_q_heads, head_dim) with the sequences' new tokens packed along "
                         f"dim 0, got shape {tuple(q.shape)}.")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must both be (num_blocks, block_size, num_kv_heads, head_dim), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}.")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share strides and have a contiguous last dim; call .contiguous().")
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"q has head_dim {head_dim} but the cache has {cache_dim}.")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 (tl.dot's minimum), got {head_dim}.")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads}) for "
                         "grouped-query attention.")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache and v_cache must share one dtype out of fp16/bf16/fp32, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}; cast them with .to(...).")
    if q.stride(-1) != 1:
        raise ValueError("q's last dim must be contiguous; call q.contiguous().")
    if cu_seqlens_q.dim() != 1 or len(cu_seqlens_q) < 1 or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(f"cu_seqlens_q must be an int32 (num_seqs + 1,) tensor of cumulative query counts, got "
                         f"{tuple(cu_seqlens_q.shape)} {cu_seqlens_q.dtype}; use .to(torch.int32).")
    num_seqs = len(cu_seqlens_q) - 1
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be an int32 (num_seqs={num_seqs}, max_blocks) tensor, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}; use .to(torch.int32).")
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be an int32 ({num_seqs},) tensor (one per cu_seqlens_q interval), got "
                         f"{tuple(seq_lens.shape)} {seq_lens.dtype}; use .to(torch.int32).")
    if block_tables.stride(-1) != 1 or cu_seqlens_q.stride(0) != 1 or seq_lens.stride(0) != 1:
        raise ValueError("block_tables' last dim, cu_seqlens_q and seq_lens must be contiguous; call .contiguous().")
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}.")
    if q.device.type == "cpu" and not labkit.device.INTERPRETER:
        raise ValueError("the inputs are on the CPU but Triton compiles for the GPU here: move them to 'cuda'.")
    return num_seqs, num_q_heads, num_kv_heads, head_dim, block_size


def _check_values(q, k_cache, block_tables, cu_seqlens_q, seq_lens):
    """The index tensors' values: reads them on the host, which on the GPU waits for every queued kernel."""
    num_tokens, (num_blocks, block_size) = q.shape[0], k_cache.shape[:2]
    cu, lens, tables = cu_seqlens_q.cpu(), seq_lens.cpu(), block_tables.cpu()
    q_lens = cu.diff()
    if int(cu[0]) != 0 or int(cu[-1]) != num_tokens or (q_lens < 0).any():
        raise ValueError(f"cu_seqlens_q must start at 0, never decrease and end at num_tokens={num_tokens}, "
                         f"got {cu.tolist()}.")
    capacity = tables.shape[1] * block_size
    if (lens < q_lens).any() or (lens > capacity).any():
        raise ValueError(f"every seq_len must be in [q_len, max_blocks * block_size = {capacity}] (it counts the "
                         f"cached prefix and the new tokens), got seq_lens {lens.tolist()}, q_lens {q_lens.tolist()}.")
    for s in range(len(lens)):
        read = (int(lens[s]) + block_size - 1) // block_size if q_lens[s] else 0  # q_len 0: nothing is read
        used = tables[s, :read]
        if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
            raise ValueError(f"block_tables[{s}] points outside the cache (num_blocks={num_blocks}): "
                             f"{used.tolist()}.")


def _config(q: torch.Tensor, head_dim: int, overrides: dict) -> dict:
    if q.device.type == "cuda":
        base = GPU_CONFIG[q.dtype == torch.float32, head_dim > 128]
    else:
        base = CPU_CONFIG
    unknown = set(overrides) - set(base)
    if unknown:
        raise ValueError(f"unknown launch settings {sorted(unknown)}; known: {sorted(base)}.")
    cfg = {**base, **overrides}
    for key in ("BLOCK_ROWS", "BLOCK_N"):
        if cfg[key] < 16 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"{key} must be a power of two >= 16 (tl.dot's minimum), got {cfg[key]}.")
    return cfg


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=None, *, check=None,
                            **launch):
    """Causal attention of a packed batch of new query runs over a paged KV cache (chunked prefill, decode rows).

    Args:
        q: (num_tokens, num_q_heads, head_dim), RoPE applied; rows cu_seqlens_q[s]:cu_seqlens_q[s+1] are sequence s's.
        k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim), this step's keys/values already written.
        block_tables: (num_seqs, max_blocks) int32; entries past a sequence's blocks are never read.
        cu_seqlens_q: (num_seqs + 1,) int32 cumulative query counts, cu[0] = 0, cu[-1] = num_tokens.
        seq_lens: (num_seqs,) int32 tokens of each sequence in the cache after this step (prefix + q_len): query i
            of sequence s sits at position seq_lens[s] - q_len + i and sees keys 0 .. that position.
        scale: softmax scale, default head_dim ** -0.5.
        check: check the index tensors' values (a host sync on the GPU). None: only on the CPU, where it is free.
        **launch: overrides of GPU_CONFIG / CPU_CONFIG (BLOCK_ROWS, BLOCK_N, num_warps, num_stages), to tune.

    Returns (num_tokens, num_q_heads, head_dim) in q's dtype. On the GPU (check off, the default there) the
    launch reads no tensor values on the host, so it can be captured in a CUDA graph and replayed with other
    lengths of the same shapes; values that break the rules above then read out of bounds, unreported.
    """
    num_seqs, num_q_heads, num_kv_heads, head_dim, block_size = _check_inputs(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens)
    if check or (check is None and q.device.type == "cpu"):  # free on the CPU; a sync on the GPU
        _check_values(q, k_cache, block_tables, cu_seqlens_q, seq_lens)
    cfg = _config(q, head_dim, launch)
    group = num_q_heads // num_kv_heads
    block_rows = max(cfg["BLOCK_ROWS"], triton.next_power_of_2(group))  # at least one token's whole group
    block_m = block_rows // group
    scale = head_dim**-0.5 if scale is None else float(scale)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    num_tiles = q.shape[0] // block_m + num_seqs  # enough for any split of num_tokens into num_seqs runs
    _paged_prefill_attention_kernel[(num_tiles, num_kv_heads)](
        out, q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale * LOG2E, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *k_cache.stride()[:3], block_tables.stride(0),
        GROUP=group, BLOCK_M=block_m, BLOCK_ROWS=block_rows, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_N=cfg["BLOCK_N"], DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32: no tf32
        DOT_IN_FP32=labkit.device.INTERPRETER and q.dtype == torch.bfloat16,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
