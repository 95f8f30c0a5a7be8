"""Worked solutions for notebook 05."""
import torch

import labkit  # noqa: F401  (before triton: sets the interpreter up on the CPU)
import triton
import triton.language as tl


def gather_kv(cache, block_table, seq_len):
    block_size = cache.shape[1]
    rows = []
    for n in range(seq_len):  # token n: row n % block_size of physical block block_table[n // block_size]
        rows.append(cache[int(block_table[n // block_size]), n % block_size])
    return torch.stack(rows)  # (seq_len, Hkv, D)


def online_softmax_update(m, l, acc, s, v):
    m_new = torch.maximum(m, s.amax(dim=1))
    rescale = torch.exp(m - m_new)  # how much the old terms shrink under the new maximum
    p = torch.exp(s - m_new[:, None])
    l_new = l * rescale + p.sum(dim=1)
    acc_new = acc * rescale[:, None] + p @ v
    return m_new, l_new, acc_new


def merge_partitions(part_out, part_lse):
    big = part_lse.max()
    w = torch.exp(part_lse - big)  # each partition's share of the total softmax mass, unnormalised
    return (w[:, None] * part_out).sum(dim=0) / w.sum()


@triton.jit
def _v1_kernel(out_ptr, q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, scale,
               stride_qs, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
               GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    qh = tl.program_id(0)
    seq = tl.program_id(1)
    seq_len = tl.load(lens_ptr + seq)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qs + qh * stride_qh + d) * scale
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        valid = n < seq_len
        # the token's cache row: physical block from the block table, offset inside the block
        block_id = tl.load(bt_ptr + seq * stride_bt + n // BLOCK_SIZE, mask=valid, other=0)
        row = block_id * stride_cb + (n % BLOCK_SIZE) * stride_cs + (qh // GROUP) * stride_ch
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.where(valid, tl.sum(q[None, :] * k, axis=1), float("-inf"))
        # online softmax
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    tl.store(out_ptr + (seq * tl.num_programs(0) + qh) * HEAD_DIM + d, acc / l_i)


def paged_attention_v1(q, k_cache, v_cache, block_tables, seq_lens):
    num_seqs, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(num_seqs, num_q_heads, head_dim, dtype=torch.float32, device=q.device)
    _v1_kernel[(num_q_heads, num_seqs)](
        out, q, k_cache, v_cache, block_tables, seq_lens, head_dim**-0.5,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], block_tables.stride(0),
        GROUP=num_q_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_N=16,
    )
    return out.to(q.dtype)
