"""Notebook 05 exercises: read a paged cache, the online-softmax update, the split-K merge, a v1 kernel."""
import torch

from kernels.paged_attention import gather_kv, paged_attention_ref
from labkit.exercises import Exercise


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _gather_inputs(gen):
    block_size = [2, 4, 8, 16][_int(gen, 0, 4)]
    seq_len = _int(gen, 1, 60)
    used = -(-seq_len // block_size)
    num_blocks = used + _int(gen, 0, 5)
    cache = torch.randn(num_blocks, block_size, _int(gen, 1, 4), [2, 4, 8][_int(gen, 0, 3)], generator=gen)
    block_table = torch.randperm(num_blocks, generator=gen)[: used + _int(gen, 0, num_blocks - used + 1)]
    return cache, block_table.to(torch.int32), seq_len


def _online_softmax_update(m, l, acc, s, v):
    """Reference: fold one tile of scores s (G, N) and values v (N, D) into the running (m, l, acc)."""
    m_new = torch.maximum(m, s.max(dim=1).values)
    alpha = torch.exp(m - m_new)  # 0 on the first tile, where m = -inf
    p = torch.exp(s - m_new[:, None])
    return m_new, alpha * l + p.sum(dim=1), alpha[:, None] * acc + p @ v


# Scores and log-sum-exps as a kernel meets them: small, and also large (long contexts, unscaled logits, a peaked
# softmax). float32's exp overflows above ~88.7, so a solution that exponentiates without subtracting the running
# maximum returns inf or NaN on the large ones; a negative offset makes every naive exp underflow to 0 (0 / 0).
_OFFSETS = (0.0, 0.0, 100.0, -100.0, 1000.0, -1000.0)


def _offset(gen) -> float:
    return _OFFSETS[_int(gen, 0, len(_OFFSETS))]


def _online_inputs(gen):
    G, N, D = _int(gen, 1, 5), _int(gen, 1, 9), _int(gen, 2, 9)
    base = _offset(gen)
    s = base + 3 * torch.randn(G, N, generator=gen)
    v = torch.randn(N, D, generator=gen)
    if _int(gen, 0, 3) == 0:  # the first tile: nothing folded in yet
        return torch.full((G,), float("-inf")), torch.zeros(G), torch.zeros(G, D), s, v
    # the running max sits above the tile for some rows (alpha = 1) and below it for others (rescale)
    m = base + 3 * torch.randn(G, generator=gen)
    return m, torch.rand(G, generator=gen) * 5 + 0.1, torch.randn(G, D, generator=gen), s, v


def _merge_partitions(part_out, part_lse):
    """Reference: softmax over the partitions' log-sum-exps weights their normalised outputs."""
    return torch.softmax(part_lse, dim=0) @ part_out


def _merge_inputs(gen):
    P, D = _int(gen, 1, 9), _int(gen, 2, 9)
    return torch.randn(P, D, generator=gen), _offset(gen) + 10 * torch.randn(P, generator=gen)


def _decode_inputs(gen):
    """A tiny paged decode problem with shuffled blocks and ragged lengths (run in Triton's interpreter)."""
    num_seqs, num_kv_heads, group = _int(gen, 1, 4), _int(gen, 1, 3), _int(gen, 1, 3)
    block_size, head_dim = [4, 8][_int(gen, 0, 2)], 16
    seq_lens = [_int(gen, 1, 40) for _ in range(num_seqs)]
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 2
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    block_tables = torch.zeros(num_seqs, max(per_seq), dtype=torch.int32)
    start = 0
    for s, nb in enumerate(per_seq):
        block_tables[s, :nb] = perm[start : start + nb]
        start += nb
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    q = torch.randn(num_seqs, num_kv_heads * group, head_dim, generator=gen)
    return (q, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), block_tables,
            torch.tensor(seq_lens, dtype=torch.int32))


EXERCISES = {
    "gather_kv": Exercise(
        reference=gather_kv, make_inputs=_gather_inputs,
        spec="one sequence's (seq_len, num_kv_heads, head_dim) keys from a paged cache "
             "(num_blocks, block_size, num_kv_heads, head_dim) through its block table.",
        hints=("Token n lives in physical block block_table[n // block_size], at row n % block_size.",
               "Loop over n in range(seq_len) and torch.stack the rows, or index in one go: "
               "cache[block_table[n // block_size], n % block_size] with n = torch.arange(seq_len).",
               "The block table may be longer than the sequence needs; only its first ceil(seq_len / block_size) "
               "entries hold this sequence's tokens.")),
    "online_softmax_update": Exercise(
        reference=_online_softmax_update, make_inputs=_online_inputs, compare="allclose", atol=1e-5, rtol=1e-5,
        spec="fold one tile of scores s (G, N) and values v (N, D) into the running max m (G,), "
             "denominator l (G,) and weighted sum acc (G, D); return (m_new, l_new, acc_new). Natural exp. "
             "Scores may be large (|s| ~ 1000): exponentiate only differences from the running maximum.",
        output_names=("m_new", "l_new", "acc_new"),
        hints=("m_new = the larger of m and the tile's row maxima (torch.maximum(m, s.amax(dim=1))).",
               "Never exp a raw score: p = exp(s - m_new[:, None]) is at most 1, and alpha = exp(m - m_new) "
               "rescales what was summed under the old maximum (exp(-inf) = 0 on the first tile).",
               "l_new = alpha * l + p.sum(dim=1); acc_new = alpha[:, None] * acc + p @ v.")),
    "merge_partitions": Exercise(
        reference=_merge_partitions, make_inputs=_merge_inputs, compare="allclose", atol=1e-5, rtol=1e-5,
        spec="combine P partitions' normalised outputs part_out (P, D) and log-sum-exps part_lse (P,) "
             "into the attention output (D,) of the whole context. lse values may be large (~ +-1000).",
        hints=("Partition p holds exp(lse_p) of the softmax mass; its share of the whole is exp(lse_p) / sum exp(lse).",
               "exp(1000) is inf in float32: subtract the largest lse before exponentiating (the shares do not "
               "change), i.e. w = exp(part_lse - part_lse.max()).",
               "out = (w[:, None] * part_out).sum(0) / w.sum(), or torch.softmax(part_lse, 0) @ part_out.")),
    "paged_attention_v1": Exercise(
        reference=paged_attention_ref, make_inputs=_decode_inputs, compare="allclose", atol=1e-4, rtol=1e-4,
        trials=4,
        spec="paged decode attention (num_seqs, num_q_heads, D) with a Triton kernel, one program per "
             "(query head, sequence): fill in the token's cache row and the online-softmax update.",
        hints=("block_id = tl.load(bt_ptr + seq * stride_bt + n // BLOCK_SIZE, mask=valid, other=0).",
               "row = block_id * stride_cb + (n % BLOCK_SIZE) * stride_cs + (qh // GROUP) * stride_ch.",
               "The update is exercise 2 for one query: m_new = tl.maximum(m_i, tl.max(s, axis=0)); alpha = "
               "tl.exp(m_i - m_new); p = tl.exp(s - m_new); then l_i, acc and finally m_i = m_new.")),
}
