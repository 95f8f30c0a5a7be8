"""Paged-attention decode in Triton: four versions, side by side.

What you will learn
-------------------
* How a kernel reads a sequence's keys and values through a **block table**: logical token ``n`` of
  sequence ``s`` lives in physical block ``block_tables[s, n // block_size]`` at row ``n % block_size``.
* Why decode attention is a **memory-bound** problem: every cached K/V byte is read once per step and
  used for about one multiply-add per query head, so the speed limit is memory bandwidth.
* **Online softmax**: one pass over the keys, keeping a running maximum ``m``, a running denominator
  ``l`` and a running weighted sum ``acc``, rescaled whenever the maximum grows.
* **v1 -> v2**: with grouped-query attention (GQA) ``group = num_q_heads // num_kv_heads`` query heads
  share one KV head. v1 runs one program per query head and reads each KV head ``group`` times; v2 runs
  one program per KV head, stacks the group's queries into a matrix and uses ``tl.dot`` (tensor cores).
  ``tl.dot`` needs at least 16 rows on the GPU, so the group is padded to 16 rows (wasted arithmetic,
  no extra bytes: the kernel is memory-bound).
* **v2 -> v3 (split-K, "flash-decoding")**: v2 has only ``num_seqs * num_kv_heads`` programs; at batch 1
  that is 8 programs for a GPU with 132 multiprocessors. v3 also splits each context into partitions,
  each program writes a partial result plus its log-sum-exp, and a second small kernel merges them.
* **v3 -> v4 (the last program merges)**: at batch 1 a whole step takes ~80 us, so v3's second launch (a few
  us, plus its own ramp-up and tail) is a visible share. v4 keeps one launch: each split program stores its
  partial, then bumps an atomic counter of its (sequence, KV head); the program that sees
  ``num_parts - 1`` knows every other partial is stored, merges them all (in the fixed order 0..S-1, so the
  result does not depend on which program came last) and writes the output. Two lessons ride along:
  *memory ordering* (the stores must be visible before the increment is: a barrier so every thread of the
  program has stored, then a release-acquire atomic) and *a workspace that resets itself* (the merging
  program sets its counter back to 0, so the counters are allocated once and reused, CUDA graphs included).
  Measured (H200, fp16, data/bench/paged_attention_v4.json): v4 is *slower* than v3, 0.90x at 1 x 65536 and
  0.93x at 4 x 16384 (71-73 % of copy bandwidth against v3's 78-79 %), probably because the merge now waits
  for the slowest partition inside the step and runs on a few programs, where v3's second launch spread it
  over the GPU. So ``auto`` keeps v3 (SPLIT_K_VERSION); the lesson is that saving a launch is not free.

The blocked algorithm (v2; v1 is the same with one query row, v3 and v4 run it over one partition)::

    for each (seq s, kv head h) in parallel:
        Q   = q[s, h*group : (h+1)*group, :]              # (group -> padded to 16, D)
        m   = -inf; l = 0; acc = 0                         # per query row
        for start in range(0, seq_len[s], BLOCK_N):        # a tile of BLOCK_N tokens
            n     = start + arange(BLOCK_N)                # logical token indices
            block = block_tables[s, n // block_size]       # physical block of each token
            K, V  = cache[block, n % block_size, h, :]     # gathered (BLOCK_N, D) tiles
            S     = (Q @ K^T) * scale                      # (16, BLOCK_N), -inf past seq_len
            m_new = max(m, rowmax(S))
            P     = exp(S - m_new);  alpha = exp(m - m_new)
            l     = alpha * l + rowsum(P)
            acc   = alpha * acc + P @ V
            m     = m_new
        out[s, group rows] = acc / l

v4's epilogue, after a split program has run the loop over its partition ``p`` of ``(s, h)``::

    part_out[s, rows, p] = acc / l;  part_lse[s, rows, p] = m + log2(l)
    barrier()                                              # every thread of the program has stored
    if atomic_add(counter[s, h], 1, acq_rel) == num_parts - 1:   # the last of the partitions to finish
        out[s, rows] = merge(part_out[s, rows, 0..S-1], part_lse[...])   # v3's reduce, in order 0..S-1
        counter[s, h] = 0                                  # ready for the next call

The plain-torch reference :func:`paged_attention_ref` gathers the blocks into contiguous K/V and runs
ordinary softmax attention in float32; every version is tested against it (tests/test_paged_attention.py).
On the CPU the kernels run through Triton's interpreter (slowly; keep shapes tiny).
"""
from __future__ import annotations

import torch

import labkit.device  # noqa: F401  (switches Triton to its interpreter when there is no GPU)
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the kernels use exp2: exp(x) = exp2(x * log2(e))

# Launch settings chosen on an H200 (fp16, 32 query / 8 KV heads, D 128, block size 16) with
# `python -m labkit.bench paged_attention --tune`: 64-token tiles, 4 warps and 3 pipeline stages were best (or
# within noise of it) for v2 and v3 on every shape; v1 prefers 128-token tiles. The interpreter ignores
# num_warps / num_stages.
GPU_CONFIG = {
    "v1": dict(BLOCK_N=128, num_warps=8, num_stages=2),
    "v2": dict(BLOCK_N=64, num_warps=4, num_stages=3),
    "v3": dict(BLOCK_N=64, num_warps=4, num_stages=3, partition_size=None),  # None: default_partition_size()
    # v4 starts from v3's settings (not yet tuned on a GPU); MERGE_P partitions are merged per step, smaller
    # than v3's reduce uses because the merge runs inside a program that also holds the split's registers
    "v4": dict(BLOCK_N=64, num_warps=4, num_stages=3, partition_size=None, MERGE_P=32),
}
CPU_CONFIG = {  # small tiles: the interpreter's cost grows with the number of elements per op
    "v1": dict(BLOCK_N=16, num_warps=1, num_stages=1),
    "v2": dict(BLOCK_N=16, num_warps=1, num_stages=1),
    "v3": dict(BLOCK_N=16, num_warps=1, num_stages=1, partition_size=32),
    "v4": dict(BLOCK_N=16, num_warps=1, num_stages=1, partition_size=32, MERGE_P=16),
}
# With 3 stages a v2/v3 program buffers 3 x (64 x 128 K + 64 x 128 V) fp16 = 96 KB of shared memory, so two
# run at once on a multiprocessor. "auto" picks v2 when its (seq, KV head) programs fill that one wave;
# below it the GPU would sit partly idle, so it splits the contexts (v3).
V2_MIN_PROGRAMS_PER_SM = 2
# v3 sizes its partitions for about two waves of programs: on the H200 that beat both one wave (the tail
# of the slowest program shows) and four (more partial results to merge, shorter loops).
V3_TARGET_PROGRAMS_PER_SM = 4
# v4 has no second launch, so fewer, longer partitions (fewer partials to merge) may pay off at batch <= 4;
# kept equal to v3's until `--tune` on a GPU says otherwise (it tries partition sizes explicitly).
V4_TARGET_PROGRAMS_PER_SM = 4
# The split-K version "auto" picks below V2_MIN_PROGRAMS_PER_SM: v3 until the recorded benchmark shows v4
# faster at 1 x 65536 and 4 x 16384 (`python -m labkit.bench paged_attention --impls labkit_v3,labkit_v4`).
SPLIT_K_VERSION = "v3"
NOMINAL_SM_COUNT = 132  # an H100's count, used to make "auto" choose the same way on the CPU


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------
def gather_kv(cache, block_table, seq_len):
    """One sequence's keys (or values) as a contiguous (seq_len, num_kv_heads, head_dim) tensor.

    cache: (num_blocks, block_size, num_kv_heads, head_dim); block_table: (max_blocks,) ints, entry i is
    the physical block of logical block i; token n is row n % block_size of block block_table[n // block_size].
    """
    block_size = cache.shape[1]
    num_blocks = (int(seq_len) + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    return cache[blocks].flatten(0, 1)[: int(seq_len)]  # (num_blocks * block_size, Hkv, D) -> first seq_len rows


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale=None):
    """Plain torch: gather each sequence's blocks into contiguous K/V, then softmax attention in fp32.

    q (num_seqs, num_q_heads, D); k_cache, v_cache (num_blocks, block_size, num_kv_heads, D);
    block_tables (num_seqs, max_blocks) int; seq_lens (num_seqs,) int. Returns (num_seqs, num_q_heads, D)
    in q's dtype.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    group = num_q_heads // k_cache.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    for s in range(num_seqs):
        k = gather_kv(k_cache, block_tables[s], seq_lens[s]).float()  # (L, Hkv, D)
        v = gather_kv(v_cache, block_tables[s], seq_lens[s]).float()
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, L, D): query head i uses kv head i // group
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.einsum("hd,hld->hl", q[s].float(), k) * scale  # (Hq, L)
        out[s] = torch.einsum("hl,hld->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _paged_attention_v1_kernel(
    out_ptr,  # [num_seqs, num_q_heads, head_dim]
    q_ptr,  # [num_seqs, num_q_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32
    qk_scale,  # softmax scale * log2(e)
    stride_qs, stride_qh,
    stride_os, stride_oh,
    stride_cb, stride_cs, stride_ch,  # k_cache and v_cache share strides
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,  # tokens per tile
):
    """v1: one program per (query head, sequence); a tile of keys is a (BLOCK_N, D) gather."""
    qh = tl.program_id(0)  # fastest-varying: the `group` heads that share a KV head run together
    seq = tl.program_id(1)
    kvh = qh // GROUP
    seq_len = tl.load(seq_lens_ptr + seq)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qs + qh * stride_qh + d).to(tl.float32) * qk_scale  # (D,)

    m_i = float("-inf")  # running max of the scores (log2 units)
    l_i = 0.0  # running sum of exp2(score - m_i)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)  # running sum of exp2(score - m_i) * v
    for start in range(0, seq_len, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)  # logical token indices
        valid = n < seq_len
        block_id = tl.load(block_tables_ptr + seq * stride_bt + n // BLOCK_SIZE, mask=valid, other=0)
        row = block_id.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kvh * stride_ch  # (BLOCK_N,)
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # (BLOCK_N, D)
        s = tl.sum(q[None, :] * k.to(tl.float32), axis=1)  # (BLOCK_N,)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m_i = m_new
    tl.store(out_ptr + seq * stride_os + qh * stride_oh + d, (acc / l_i).to(out_ptr.dtype.element_ty))


@triton.jit
def _attend_tiles(
    q,  # (BLOCK_G, D) the group's queries, rows >= GROUP are zero padding
    k_cache_ptr, v_cache_ptr, bt_row_ptr,  # bt_row_ptr: this sequence's row of block_tables
    kvh, start, end, qk_scale,
    stride_cb, stride_cs, stride_ch,
    BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax of the query group over tokens [start, end) of one sequence: (acc, m, l)."""
    d = tl.arange(0, HEAD_DIM)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    for tile in range(start, end, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)
        valid = n < end
        block_id = tl.load(bt_row_ptr + n // BLOCK_SIZE, mask=valid, other=0)
        row = block_id.to(tl.int64) * stride_cb + (n % BLOCK_SIZE) * stride_cs + kvh * stride_ch
        k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # (BLOCK_N, D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_G, BLOCK_N) fp32
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)  # (BLOCK_N, D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _paged_attention_v2_kernel(
    out_ptr,  # [num_seqs, num_q_heads, head_dim]
    q_ptr,  # [num_seqs, num_q_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32
    qk_scale,
    stride_qs, stride_qh,
    stride_os, stride_oh,
    stride_cb, stride_cs, stride_ch,
    stride_bt,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,  # GROUP padded up to a power of two >= 16 (tl.dot's minimum on the GPU)
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """v2: one program per (KV head, sequence); the query group is one (BLOCK_G, D) matrix."""
    kvh = tl.program_id(0)
    seq = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    qh = kvh * GROUP + g  # (BLOCK_G,) query heads of this group
    q = tl.load(q_ptr + seq * stride_qs + qh[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    acc, m_i, l_i = _attend_tiles(
        q, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, kvh, 0, seq_len, qk_scale,
        stride_cb, stride_cs, stride_ch, BLOCK_G, BLOCK_SIZE, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )
    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_os + qh[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])


@triton.jit
def _store_partition(
    part_out_ptr, part_lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,  # as in the split kernels
    kvh, seq, part, start, end, num_kv_heads, qk_scale,
    stride_qs, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, max_parts,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """v2's loop over tokens [start, end) of (seq, kvh); stores the partition's normalised output and lse."""
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    qh = kvh * GROUP + g
    q = tl.load(q_ptr + seq * stride_qs + qh[:, None] * stride_qh + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    acc, m_i, l_i = _attend_tiles(
        q, k_cache_ptr, v_cache_ptr, block_tables_ptr + seq * stride_bt, kvh, start, end, qk_scale,
        stride_cb, stride_cs, stride_ch, BLOCK_G, BLOCK_SIZE, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )
    row = (seq * (GROUP * num_kv_heads) + qh) * max_parts + part  # (BLOCK_G,) flat (seq, qh, part)
    tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], acc / l_i[:, None], mask=(g < GROUP)[:, None])
    tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=g < GROUP)


@triton.jit
def _merge_partitions(
    part_out_ptr,  # [num_seqs, num_q_heads, max_parts, head_dim] fp32
    part_lse_ptr,  # [num_seqs, num_q_heads, max_parts] fp32
    base, num_parts,  # base: flat index of (seq, query head, partition 0)
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """One query head's output from its partitions 0..num_parts-1, merged BLOCK_P at a time in that order.

    Partition p holds out_p = sum_j e^(s_j) v_j / l_p and lse_p = log2(l_p) + m_p (log2 units), so
    out = sum_p 2^(lse_p - LSE) out_p with LSE = log2(sum_p 2^lse_p). The loads bypass L1 (".cg"): in v4 the
    partials were written by other multiprocessors during this same launch.
    """
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, HEAD_DIM)
    m = float("-inf")
    denom = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):  # usually a single step: BLOCK_P covers every partition
        live = p0 + p < num_parts
        lse = tl.load(part_lse_ptr + base + p0 + p, mask=live, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(part_out_ptr + (base + p0 + p)[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0,
                    cache_modifier=".cg")  # (BLOCK_P, D)
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        denom = denom * alpha + tl.sum(w, axis=0)
        acc = acc * alpha + tl.sum(w[:, None] * o, axis=0)
        m = m_new
    return acc / denom


@triton.jit
def _paged_attention_v3_split_kernel(
    part_out_ptr,  # [num_seqs, num_q_heads, max_parts, head_dim] fp32, each partition's normalised output
    part_lse_ptr,  # [num_seqs, num_q_heads, max_parts] fp32, each partition's log2-sum-exp2 of scores
    q_ptr,  # [num_seqs, num_q_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32
    qk_scale,
    stride_qs, stride_qh,
    stride_cb, stride_cs, stride_ch,
    stride_bt,
    max_parts,
    partition,  # tokens per partition, a multiple of BLOCK_N (a run-time value: no recompile per size)
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """v3, pass 1: one program per (KV head, sequence, partition) runs v2's loop over its partition."""
    kvh = tl.program_id(0)
    seq = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = part * partition
    if start >= seq_len:  # the grid is sized for the longest possible context; this one is shorter
        return
    _store_partition(
        part_out_ptr, part_lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
        kvh, seq, part, start, tl.minimum(start + partition, seq_len), tl.num_programs(0), qk_scale,
        stride_qs, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, max_parts,
        GROUP, BLOCK_G, BLOCK_SIZE, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )


@triton.jit
def _paged_attention_v3_reduce_kernel(
    out_ptr,  # [num_seqs, num_q_heads, head_dim]
    part_out_ptr,  # [num_seqs, num_q_heads, max_parts, head_dim] fp32
    part_lse_ptr,  # [num_seqs, num_q_heads, max_parts] fp32
    seq_lens_ptr,  # [num_seqs] int32
    stride_os, stride_oh,
    max_parts,
    partition,
    HEAD_DIM: tl.constexpr,
    BLOCK_P: tl.constexpr,  # partitions merged per step
):
    """v3, pass 2: one program per (query head, sequence) merges its partitions (see _merge_partitions)."""
    qh = tl.program_id(0)
    seq = tl.program_id(1)
    num_parts = tl.cdiv(tl.load(seq_lens_ptr + seq), partition)
    base = (seq * tl.num_programs(0) + qh) * max_parts
    out = _merge_partitions(part_out_ptr, part_lse_ptr, base, num_parts, HEAD_DIM, BLOCK_P)
    d = tl.arange(0, HEAD_DIM)
    tl.store(out_ptr + seq * stride_os + qh * stride_oh + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _paged_attention_v4_kernel(
    out_ptr,  # [num_seqs, num_q_heads, head_dim]
    part_out_ptr,  # [num_seqs, num_q_heads, max_parts, head_dim] fp32, each partition's normalised output
    part_lse_ptr,  # [num_seqs, num_q_heads, max_parts] fp32, each partition's log2-sum-exp2 of scores
    counter_ptr,  # [num_seqs, num_kv_heads] int32: partitions of (seq, kv head) stored so far; 0 between calls
    q_ptr,  # [num_seqs, num_q_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32
    qk_scale,
    stride_qs, stride_qh,
    stride_os, stride_oh,
    stride_cb, stride_cs, stride_ch,
    stride_bt,
    max_parts,
    partition,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,  # partitions merged per step
    DOT_PRECISION: tl.constexpr,
):
    """v4: v3's split program, and the last partition of each (sequence, KV head) to finish merges them all."""
    kvh = tl.program_id(0)
    seq = tl.program_id(1)
    part = tl.program_id(2)
    num_kv_heads = tl.num_programs(0)
    seq_len = tl.load(seq_lens_ptr + seq)
    start = part * partition
    if start >= seq_len:  # not one of this sequence's partitions: it neither stores nor counts
        return
    _store_partition(
        part_out_ptr, part_lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr,
        kvh, seq, part, start, tl.minimum(start + partition, seq_len), num_kv_heads, qk_scale,
        stride_qs, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, max_parts,
        GROUP, BLOCK_G, BLOCK_SIZE, HEAD_DIM, BLOCK_N, DOT_PRECISION,
    )
    num_parts = tl.cdiv(seq_len, partition)
    counter = counter_ptr + seq * num_kv_heads + kvh
    # The partial was stored by all threads of the program, the atomic is issued by one: the barrier makes every
    # thread's stores happen before it, and the release half of acq_rel publishes them (at GPU scope) with the
    # increment. The acquire half, in the program that sees num_parts - 1, makes every other program's released
    # stores visible to the loads that follow.
    tl.debug_barrier()
    stored_before = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if stored_before == num_parts - 1:  # every other partition is stored: this program merges
        d = tl.arange(0, HEAD_DIM)
        for g in tl.static_range(GROUP):  # unrolled: the heads' loads are independent and overlap
            qh = kvh * GROUP + g
            base = (seq * (GROUP * num_kv_heads) + qh) * max_parts
            out = _merge_partitions(part_out_ptr, part_lse_ptr, base, num_parts, HEAD_DIM, BLOCK_P)
            tl.store(out_ptr + seq * stride_os + qh * stride_oh + d, out.to(out_ptr.dtype.element_ty))
        # Every partition of (seq, kvh) has counted, so nothing else touches the counter in this launch; the
        # launch boundary orders this reset before the next call's increments.
        tl.store(counter, 0)


# ------------------------------------------------------------------------------------------------
# Wrappers
# ------------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q, k_cache, v_cache, block_tables, seq_lens):
    """Shapes, dtypes and devices; on the CPU also the values (on the GPU that would cost a sync)."""
    tensors = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if q.dim() != 3:
        raise ValueError(
            f"q must be (num_seqs, num_q_heads, head_dim), got shape {tuple(q.shape)}; "
            "for a (B, H, 1, D) decode query pass q[:, :, 0]."
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be (num_blocks, block_size, num_kv_heads, head_dim), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}."
        )
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have the same strides and a contiguous last dim; "
                         "call .contiguous().")
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, cache_dim = k_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"q has head_dim {head_dim} but the cache has {cache_dim}.")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16 (tl.dot's minimum), got {head_dim}.")
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads}) "
            "for grouped-query attention."
        )
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q, k_cache and v_cache must share one dtype out of fp16/bf16/fp32, got {q.dtype}, {k_cache.dtype}, "
            f"{v_cache.dtype}; cast them with .to(...)."
        )
    if q.stride(-1) != 1:
        raise ValueError("q's last dim must be contiguous; call q.contiguous().")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.dtype != torch.int32:
        raise ValueError(
            f"block_tables must be an int32 (num_seqs={num_seqs}, max_blocks) tensor, got {tuple(block_tables.shape)} "
            f"{block_tables.dtype}; use .to(torch.int32)."
        )
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables' last dim must be contiguous; call .contiguous().")
    if seq_lens.shape != (num_seqs,) or seq_lens.dtype != torch.int32:
        raise ValueError(
            f"seq_lens must be an int32 ({num_seqs},) tensor, got {tuple(seq_lens.shape)} {seq_lens.dtype}; "
            "use .to(torch.int32)."
        )
    devices = {t.device for t in tensors.values()}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}.")
    device = q.device
    if device.type == "cpu" and not labkit.device.INTERPRETER:
        raise ValueError("the inputs are on the CPU but Triton compiles for the GPU here: move them to 'cuda'.")
    if device.type == "cpu":  # free to check values here; on the GPU it would stall the launch queue
        capacity = block_tables.shape[1] * block_size
        if num_seqs and (int(seq_lens.min()) < 1 or int(seq_lens.max()) > capacity):
            raise ValueError(
                f"every seq_len must be in [1, max_blocks * block_size = {capacity}], got {seq_lens.tolist()}; "
                "a decode step attends to at least the token it just wrote."
            )
        for s in range(num_seqs):
            used = block_tables[s, : (int(seq_lens[s]) + block_size - 1) // block_size]
            if used.numel() and (int(used.min()) < 0 or int(used.max()) >= k_cache.shape[0]):
                raise ValueError(
                    f"block_tables[{s}] points outside the cache (num_blocks={k_cache.shape[0]}): {used.tolist()}."
                )
    return num_seqs, num_q_heads, num_kv_heads, head_dim, block_size


def _config(version: str, device: torch.device, overrides: dict) -> dict:
    base = (GPU_CONFIG if device.type == "cuda" else CPU_CONFIG)[version]
    unknown = set(overrides) - set(base)
    if unknown:
        raise ValueError(f"unknown launch settings {sorted(unknown)} for {version}; known: {sorted(base)}.")
    cfg = {**base, **overrides}
    if cfg["BLOCK_N"] < 16 or cfg["BLOCK_N"] & (cfg["BLOCK_N"] - 1):
        raise ValueError(f"BLOCK_N must be a power of two >= 16, got {cfg['BLOCK_N']}.")
    return cfg


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NOMINAL_SM_COUNT


def choose_version(num_seqs: int, num_kv_heads: int, sm_count: int = NOMINAL_SM_COUNT) -> str:
    """"v2" when (sequence, KV head) programs alone fill the GPU, else SPLIT_K_VERSION (split the contexts)."""
    return "v2" if num_seqs * num_kv_heads >= V2_MIN_PROGRAMS_PER_SM * sm_count else SPLIT_K_VERSION


def default_partition_size(num_seqs, num_kv_heads, max_context, block_n, sm_count: int = NOMINAL_SM_COUNT,
                           target_programs_per_sm: int = V3_TARGET_PROGRAMS_PER_SM) -> int:
    """A split-K partition: a power of two >= BLOCK_N giving about target_programs_per_sm programs per SM."""
    wanted_parts = max(1, -(-target_programs_per_sm * sm_count // (num_seqs * num_kv_heads)))
    return max(block_n, triton.next_power_of_2(-(-max_context // wanted_parts)))


# v4's counters, one int32 per (sequence, KV head), keyed by (device, size rounded up to a power of two). They
# are zero between calls (each call's merging programs reset theirs), so they are allocated once and never
# freed: a CUDA graph captured over a call keeps pointing at the same memory. Calls running at the same time on
# two streams of one device would share them; a decode loop runs one call at a time.
_V4_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}


def v4_counters(device: torch.device, num_counters: int) -> torch.Tensor:
    """The zeroed int32 workspace of v4's "last program merges" counters (at least num_counters of them)."""
    size = triton.next_power_of_2(max(1, num_counters))
    key = (str(device), size)
    if key not in _V4_COUNTERS:
        counters = torch.zeros(size, dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # First seen inside a capture: the graph's memory pool owns the tensor and the graph replays the
            # zeroing with every call, so it is correct but not cached (eager calls must not share graph memory).
            return counters
        _V4_COUNTERS[key] = counters
    return _V4_COUNTERS[key]


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None, version="auto", **launch):
    """Decode attention over a paged KV cache: one new query token per sequence.

    Args:
        q: (num_seqs, num_q_heads, head_dim) the new tokens' queries (RoPE applied).
        k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim).
        block_tables: (num_seqs, max_blocks) int32; entry [s, i] is the physical block holding tokens
            i*block_size ... (i+1)*block_size - 1 of sequence s. Entries past a sequence's length are ignored.
        seq_lens: (num_seqs,) int32, the number of cached tokens each query attends to (>= 1).
        scale: softmax scale, default head_dim ** -0.5.
        version: "v1", "v2", "v3", "v4" or "auto" (v2 or SPLIT_K_VERSION by :func:`choose_version`).
        **launch: optional launch settings overriding GPU_CONFIG / CPU_CONFIG (BLOCK_N, num_warps,
            num_stages; partition_size for v3 and v4; MERGE_P for v4), for tuning.

    Returns (num_seqs, num_q_heads, head_dim) in q's dtype.
    """
    num_seqs, num_q_heads, num_kv_heads, head_dim, block_size = _check_inputs(q, k_cache, v_cache, block_tables,
                                                                              seq_lens)
    if version == "auto":
        version = choose_version(num_seqs, num_kv_heads, _sm_count(q.device))
    if version not in ("v1", "v2", "v3", "v4"):
        raise ValueError(f"version must be 'v1', 'v2', 'v3', 'v4' or 'auto', got {version!r}.")
    cfg = _config(version, q.device, launch)
    if q.dtype == torch.float32 and q.device.type == "cuda" and not launch:
        # fp32 tiles take twice the shared memory of fp16 ones: smaller tiles, fewer buffers in flight
        cfg.update(BLOCK_N=min(cfg["BLOCK_N"], 32), num_stages=min(cfg["num_stages"], 2))
    scale = head_dim**-0.5 if scale is None else float(scale)
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_seqs == 0:
        return out
    common = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    # fp32 inputs: keep full precision in tl.dot (its GPU default for fp32 is tf32)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    block_g = max(16, triton.next_power_of_2(group))
    cache_strides = k_cache.stride()[:3]

    if version == "v1":
        _paged_attention_v1_kernel[(num_q_heads, num_seqs)](
            out, q, k_cache, v_cache, block_tables, seq_lens, scale * LOG2E,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), *cache_strides, block_tables.stride(0),
            GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_N=cfg["BLOCK_N"], **common,
        )
    elif version == "v2":
        _paged_attention_v2_kernel[(num_kv_heads, num_seqs)](
            out, q, k_cache, v_cache, block_tables, seq_lens, scale * LOG2E,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), *cache_strides, block_tables.stride(0),
            GROUP=group, BLOCK_G=block_g, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_N=cfg["BLOCK_N"],
            DOT_PRECISION=precision, **common,
        )
    else:  # split-K: v3 (two launches) or v4 (the last program of each (sequence, KV head) merges)
        # The grid covers the longest context the block table can describe, known from shapes alone
        # (reading seq_lens.max() would make the host wait for the GPU); programs past a sequence's end exit.
        max_context = block_tables.shape[1] * block_size
        target = V3_TARGET_PROGRAMS_PER_SM if version == "v3" else V4_TARGET_PROGRAMS_PER_SM
        partition = cfg["partition_size"] or default_partition_size(
            num_seqs, num_kv_heads, max_context, cfg["BLOCK_N"], _sm_count(q.device), target)
        if partition % cfg["BLOCK_N"]:
            raise ValueError(f"partition_size ({partition}) must be a multiple of BLOCK_N ({cfg['BLOCK_N']}).")
        max_parts = triton.cdiv(max_context, partition)
        part_out = torch.empty((num_seqs, num_q_heads, max_parts, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, num_q_heads, max_parts), dtype=torch.float32, device=q.device)
        split = dict(GROUP=group, BLOCK_G=block_g, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_N=cfg["BLOCK_N"],
                     DOT_PRECISION=precision, **common)
        if version == "v3":
            _paged_attention_v3_split_kernel[(num_kv_heads, num_seqs, max_parts)](
                part_out, part_lse, q, k_cache, v_cache, block_tables, seq_lens, scale * LOG2E,
                q.stride(0), q.stride(1), *cache_strides, block_tables.stride(0), max_parts, partition, **split,
            )
            _paged_attention_v3_reduce_kernel[(num_q_heads, num_seqs)](
                out, part_out, part_lse, seq_lens, out.stride(0), out.stride(1), max_parts, partition,
                HEAD_DIM=head_dim, BLOCK_P=min(64, triton.next_power_of_2(max_parts)), num_warps=4,
            )
        else:
            merge_p = cfg["MERGE_P"]
            if merge_p < 1 or merge_p & (merge_p - 1):
                raise ValueError(f"MERGE_P must be a power of two, got {merge_p}.")
            _paged_attention_v4_kernel[(num_kv_heads, num_seqs, max_parts)](
                out, part_out, part_lse, v4_counters(q.device, num_seqs * num_kv_heads),
                q, k_cache, v_cache, block_tables, seq_lens, scale * LOG2E,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1), *cache_strides, block_tables.stride(0),
                max_parts, partition, BLOCK_P=min(merge_p, triton.next_power_of_2(max_parts)), **split,
            )
    return out


def paged_attention_v1(q, k_cache, v_cache, block_tables, seq_lens, scale=None, **launch):
    """v1: one program per (sequence, query head); see :func:`paged_attention`."""
    return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, version="v1", **launch)


def paged_attention_v2(q, k_cache, v_cache, block_tables, seq_lens, scale=None, **launch):
    """v2: one program per (sequence, KV head), the query group through tl.dot; see :func:`paged_attention`."""
    return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, version="v2", **launch)


def paged_attention_v3(q, k_cache, v_cache, block_tables, seq_lens, scale=None, **launch):
    """v3: v2 split over context partitions plus a log-sum-exp merge; see :func:`paged_attention`."""
    return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, version="v3", **launch)


def paged_attention_v4(q, k_cache, v_cache, block_tables, seq_lens, scale=None, **launch):
    """v4: v3 in one launch, the last partition of each (sequence, KV head) merges; see :func:`paged_attention`."""
    return paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, version="v4", **launch)
