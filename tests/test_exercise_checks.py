"""Each exercise of notebooks 01, 02, 05 and 10 catches the wrong answers a learner is likely to write, and its
message says which part of the answer differs (never a bare False)."""
import pytest
import torch

from labkit.exercises import _lookup, run_trials
from labkit.solutions import nb01, nb02, nb05, nb10

pytestmark = pytest.mark.timeout(120)


def caught(name, fn):
    ex, _ = _lookup(name)
    ok, msg = run_trials(fn, ex)
    assert not ok, f"{name}: a wrong solution passed"
    return msg


# ---------------------------------------------------------------------------------------------- nb01
def test_nb01_causal_mask_catches_the_upper_triangle():
    assert "the returned value" in caught("nb01.causal_mask", lambda T: torch.ones(T, T, dtype=torch.bool).triu())


def test_nb01_top_k_catches_off_by_one_and_strict_cutoff():
    def keeps_one_more(logits, k):
        return nb01.top_k_filter(logits, min(k + 1, logits.numel()))

    def drops_the_kth(logits, k):
        kth = torch.topk(logits, k).values[-1]
        return logits.masked_fill(logits <= kth, float("-inf"))

    caught("nb01.top_k_filter", keeps_one_more)
    assert "at index" in caught("nb01.top_k_filter", drops_the_kth)


def test_nb01_recomputed_tokens_catches_an_off_by_one_series():
    msg = caught("nb01.recomputed_tokens", lambda p, n: n * p + n * (n + 1) // 2)
    assert "yours is" in msg and "expected" in msg


# ---------------------------------------------------------------------------------------------- nb02
def _transposed_write(k_cache, v_cache, row, positions, k, v):
    """The classic slip: with a tensor row, k_cache[rows, :, positions] is (T, Hkv, D), and reshaping k to fit
    relabels its numbers instead of moving them (right shape, wrong values when Hkv > 1 and T > 1)."""
    if int(positions.max()) >= k_cache.shape[2]:
        raise ValueError("full")
    rows = torch.tensor([row])
    k_cache[rows, :, positions] = k.reshape(k.shape[1], k.shape[0], k.shape[2])
    v_cache[rows, :, positions] = v.reshape(v.shape[1], v.shape[0], v.shape[2])
    return k_cache[row, :, : int(positions.max()) + 1], v_cache[row, :, : int(positions.max()) + 1]


def _reads_whole_row(k_cache, v_cache, row, positions, k, v):
    nb02.write_and_read(k_cache, v_cache, row, positions, k, v)
    return k_cache[row], v_cache[row]  # the whole reservation, including an earlier request's tokens


def _writes_before_checking(k_cache, v_cache, row, positions, k, v):
    fits = positions < k_cache.shape[2]
    k_cache[row][:, positions[fits]] = k[:, fits]  # writes what fits, then complains
    v_cache[row][:, positions[fits]] = v[:, fits]
    return nb02.write_and_read(k_cache, v_cache, row, positions, k, v)


def _never_raises(k_cache, v_cache, row, positions, k, v):
    keep = positions < k_cache.shape[2]
    return nb02.write_and_read(k_cache, v_cache, row, positions[keep], k[:, keep], v[:, keep])


@pytest.mark.parametrize("wrong", [_transposed_write, _reads_whole_row, _writes_before_checking, _never_raises])
def test_nb02_write_and_read_catches_wrong_caches(wrong):
    msg = caught("nb02.write_and_read", wrong)
    assert "key 'reads'" in msg or "key 'k_cache'" in msg


def test_nb02_write_and_read_is_the_contiguous_cache_itself():
    """The reference is ContiguousCache's own write/read: a cache built from the worked solution gives the same
    attention as ContiguousCache over a prefill and decode steps."""
    from labkit.config import LlamaConfig
    from labkit.kv_cache import ContiguousCache

    cfg = LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=8, max_position_embeddings=12)
    cache = ContiguousCache(cfg, batch_size=2, max_len=12)
    gen = torch.Generator().manual_seed(0)
    mine_k, mine_v = torch.zeros_like(cache.k[0]), torch.zeros_like(cache.v[0])
    for start, T in [(0, 5), (5, 1), (6, 1), (7, 3)]:
        q, k, v = (torch.randn(2, 2, T, 8, generator=gen) for _ in range(3))
        pos = torch.arange(start, start + T).expand(2, T)
        cache.attend(0, q, k, v, pos)
        for row in range(2):
            nb02.write_and_read(mine_k, mine_v, row, pos[row], k[row], v[row])
    assert torch.equal(mine_k, cache.k[0]) and torch.equal(mine_v, cache.v[0])


# ---------------------------------------------------------------------------------------------- nb05
def _naive_merge(part_out, part_lse):
    w = torch.exp(part_lse)  # overflows to inf at lse > 88.7 (float32): inf / inf = NaN
    return (w[:, None] * part_out).sum(0) / w.sum()


def test_nb05_merge_catches_a_naive_exp_and_says_overflow():
    msg = caught("nb05.merge_partitions", _naive_merge)
    assert "overflow" in msg or "nan" in msg.lower()
    # and the naive merge is right on small inputs: only the large magnitudes expose it
    out, lse = torch.randn(4, 3), torch.randn(4)
    assert torch.allclose(_naive_merge(out, lse), torch.softmax(lse, 0) @ out, atol=1e-6)


def _online_without_max(m, l, acc, s, v):
    p = torch.exp(s)  # no running maximum: fine for small scores, inf for large ones
    scale = torch.where(torch.isinf(m), torch.zeros_like(m), torch.exp(m))
    m_new = torch.maximum(m, s.amax(dim=1))
    l_new = (l * scale + p.sum(1)) / torch.exp(m_new)
    acc_new = (acc * scale[:, None] + p @ v) / torch.exp(m_new)[:, None]
    return m_new, l_new, acc_new


def _online_forgets_to_rescale_l(m, l, acc, s, v):
    m_new, _, acc_new = nb05.online_softmax_update(m, l, acc, s, v)
    return m_new, l + torch.exp(s - m_new[:, None]).sum(1), acc_new


def test_nb05_online_softmax_catches_missing_max_and_names_l():
    caught("nb05.online_softmax_update", _online_without_max)
    assert "`l_new` (element 1)" in caught("nb05.online_softmax_update", _online_forgets_to_rescale_l)


# ---------------------------------------------------------------------------------------------- nb10
def test_nb10_pack_and_unpack_catch_the_wrong_bit_order():
    caught("nb10.pack_byte", lambda w: sum((x + 1) << (2 * (3 - i)) for i, x in enumerate(w)))
    caught("nb10.unpack_byte", lambda b: [((b >> (2 * (3 - i))) & 3) - 1 for i in range(4)])
    caught("nb10.pack_byte", lambda w: sum((x % 3) << (2 * i) for i, x in enumerate(w)))  # -1 stored as 2


def test_nb10_absmean_catches_float_codes_and_row_scales():
    def float_codes(w):
        t, scale = nb10.absmean_ternarise(w)
        return t.float(), scale

    def row_scales(w):
        scale = w.abs().mean(dim=1, keepdim=True)
        return torch.clamp(torch.round(w / (scale + 1e-5)), -1, 1).to(torch.int8), scale.reshape(-1)

    assert "`T` (element 0): dtype" in caught("nb10.absmean_ternarise", float_codes)
    assert "`T`" in caught("nb10.absmean_ternarise", row_scales) or "`scale`" in caught("nb10.absmean_ternarise",
                                                                                          row_scales)


def test_nb10_ternary_dot_catches_a_missing_scale_and_raw_codes():
    caught("nb10.ternary_dot", lambda x, packed, scale: nb10.ternary_dot(x, packed, 1.0))
    caught("nb10.ternary_dot", lambda x, packed, scale: scale * sum(
        float(x[4 * j + i]) * ((b >> (2 * i)) & 3) for j, b in enumerate(packed.tolist()) for i in range(4)))
