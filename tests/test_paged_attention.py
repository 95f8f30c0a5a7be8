"""Paged-attention decode kernels (v1, v2, v3, v4, auto) and the cache-write kernel against plain torch.

On the CPU the kernels run in Triton's interpreter: shapes stay tiny and tests use fp32. With a CUDA
device the same tests also run in fp16 and bf16, plus a few larger shapes.
"""
from __future__ import annotations

import pytest
import torch

import labkit
from kernels.cache_write import cache_write, cache_write_ref
from kernels import paged_attention as pa
from kernels.paged_attention import choose_version, paged_attention, paged_attention_ref

DEVICE = labkit.DEVICE
ON_GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # ||out - ref|| / ||ref||
VERSIONS = ["v1", "v2", "v3", "v4", "auto"]


def make_problem(gen, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, spare_blocks=3):
    """Random q and caches; each sequence's blocks are a shuffled, non-contiguous set of physical blocks.

    block_tables is itself a strided view (a column slice of a wider table) and its unused entries are -1,
    so a kernel that reads past a sequence's last block fails loudly.
    """
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    wide = torch.full((len(seq_lens), max_blocks + 2), -1, dtype=torch.int32)
    used = 0
    for s, nb in enumerate(blocks_per_seq):
        wide[s, :nb] = perm[used : used + nb].to(torch.int32)
        used += nb
    block_tables = wide[:, :max_blocks]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(len(seq_lens), num_q_heads + 1, head_dim, generator=gen)[:, 1:].to(dtype)  # a strided view
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k_cache, v_cache, block_tables, seq_lens)]


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite values in the kernel's output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check(version, problem, **launch):
    q, k_cache, v_cache, block_tables, seq_lens = problem
    ref = paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), block_tables, seq_lens)
    out = paged_attention(q, k_cache, v_cache, block_tables, seq_lens, version=version, **launch)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < TOL[q.dtype], f"{version}: relative error {rel_err(out, ref):.2e}"


# (seq_lens, num_q_heads, num_kv_heads, head_dim, block_size): length 1, lengths ending mid-block,
# exact multiples of the block size, group sizes 1, 2 and 8.
CASES = [
    ([1, 7, 8, 29], 4, 2, 64, 8),
    ([17, 3], 8, 1, 128, 16),
    ([33, 64, 5], 3, 3, 64, 32),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(version, case, dtype):
    gen = torch.Generator().manual_seed(100 + case)
    check(version, make_problem(gen, *CASES[case], dtype))


@pytest.mark.parametrize("seed", range(2))
def test_random_shapes_all_versions(seed):
    """Random small shapes; v3 with a small partition so contexts span several partitions."""
    gen = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
    num_kv_heads, group = pick([1, 2]), pick([1, 2, 4])
    block_size = pick([8, 16, 32])
    seq_lens = torch.randint(1, 70, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
    problem = make_problem(gen, seq_lens, num_kv_heads * group, num_kv_heads, 64, block_size, torch.float32)
    for version in ("v1", "v2"):
        check(version, problem)
    check("v3", problem, BLOCK_N=16, partition_size=32)
    check("v4", problem, BLOCK_N=16, partition_size=16)


@pytest.mark.skipif(not ON_GPU, reason="larger shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("version", VERSIONS)
def test_gpu_long_ragged_contexts(version, dtype):
    gen = torch.Generator().manual_seed(7)
    seq_lens = [1, 15, 16, 17, 1000, 4097, 257, 3000]
    check(version, make_problem(gen, seq_lens, 32, 8, 128, 16, dtype))


def test_v3_partition_sizes_agree():
    gen = torch.Generator().manual_seed(3)
    problem = make_problem(gen, [40, 96], 4, 2, 64, 16, torch.float32)
    for partition in (16, 32, 64):
        check("v3", problem, BLOCK_N=16, partition_size=partition)


def test_v3_reduce_merges_many_partitions():
    """The merge kernel alone on 70 random partials (two chunks of at most 64) against torch's logsumexp."""
    from kernels.paged_attention import _paged_attention_v3_reduce_kernel

    gen = torch.Generator().manual_seed(5)
    num_seqs, num_q_heads, parts, head_dim, partition = 2, 2, 70, 16, 16
    part_out = torch.randn(num_seqs, num_q_heads, parts, head_dim, generator=gen).to(DEVICE)
    part_lse = (4 * torch.randn(num_seqs, num_q_heads, parts, generator=gen)).to(DEVICE)  # log2 units
    seq_lens = torch.tensor([parts * partition, 33 * partition - 5], dtype=torch.int32, device=DEVICE)
    out = torch.empty(num_seqs, num_q_heads, head_dim, device=DEVICE)
    _paged_attention_v3_reduce_kernel[(num_q_heads, num_seqs)](
        out, part_out, part_lse, seq_lens, out.stride(0), out.stride(1), parts, partition, HEAD_DIM=head_dim, BLOCK_P=64
    )
    for s, n in enumerate([parts, 33]):
        w = torch.softmax(part_lse[s, :, :n] * torch.log(torch.tensor(2.0)), dim=-1)  # 2^lse normalised
        ref = torch.einsum("hp,hpd->hd", w, part_out[s, :, :n])
        assert rel_err(out[s], ref) < 1e-5


def test_auto_picks_split_k_only_when_the_gpu_would_be_idle():
    assert choose_version(1, 8, sm_count=132) == pa.SPLIT_K_VERSION  # 8 programs for 132 multiprocessors
    assert pa.SPLIT_K_VERSION in ("v3", "v4")
    assert choose_version(256, 8, sm_count=132) == "v2"


# ---------------------------------------------------------------- v4: the last partition merges


def counters_of(problem):
    """v4's counter workspace for this problem's (sequence, KV head) pairs: it must be all zero between calls."""
    q, k_cache = problem[0], problem[1]
    return pa.v4_counters(q.device, q.shape[0] * k_cache.shape[2])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_v4_split_counts_and_counter_reset(dtype):
    """1 to 6 partitions per sequence (lengths ending mid-block, group 4), merged 2 or 16 at a time, each
    problem run twice in a row: the second call only merges if the first left its counters at 0."""
    gen = torch.Generator().manual_seed(21)
    problem = make_problem(gen, [1, 23, 90, 41], 8, 2, 64, 16, dtype)
    for partition, merge_p in ((16, 2), (16, 16), (32, 2), (128, 16)):
        launch = dict(BLOCK_N=16, partition_size=partition, MERGE_P=merge_p)
        first = paged_attention(*problem, version="v4", **launch)
        assert not counters_of(problem).any(), f"counters not reset after a call: {counters_of(problem).tolist()}"
        check("v4", problem, **launch)  # the second call, against the reference
        again = paged_attention(*problem, version="v4", **launch)
        assert torch.equal(first, again), "v4 must be deterministic: partitions are merged in the order 0..S-1"
        if not ON_GPU and merge_p == 16:  # v3's chunks too (<= 16 partitions): on the interpreter, bit for bit v3
            assert torch.equal(first, paged_attention(*problem, version="v3", BLOCK_N=16, partition_size=partition))


@pytest.mark.timeout(120)
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("seq_lens", [[65536], [16384] * 4, [1, 300, 5000, 17]])
def test_v4_cuda_graph_replays_reuse_the_counters(seq_lens):
    """Captured once, replayed three times: no host-side zeroing between replays, the counters reset themselves."""
    gen = torch.Generator().manual_seed(8)
    problem = make_problem(gen, seq_lens, 32, 8, 128, 16, torch.float16)
    ref = paged_attention_ref(*(t.float() if t.is_floating_point() else t for t in problem))
    eager = paged_attention(*problem, version="v4")  # allocates the counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(*problem, version="v4")
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager) and rel_err(out, ref) < TOL[torch.float16]
    assert not counters_of(problem).any()


# ---------------------------------------------------------------- cache_write


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_cache_write_matches_reference(block_size, dtype):
    gen = torch.Generator().manual_seed(block_size)
    num_blocks, num_kv_heads, head_dim, num_tokens = 5, 2, 64, 11
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen).to(dtype).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 5]] = -1  # padding tokens
    slots = slots.to(DEVICE)
    # k as it comes out of attention: a (T, H, D) view of a (1, H, T, D) tensor, not contiguous
    k = torch.randn(1, num_kv_heads, num_tokens, head_dim, generator=gen).to(dtype).to(DEVICE)[0].transpose(0, 1)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    cache_write_ref(k, v, k_ref, v_ref, slots)
    cache_write(k, v, k_cache, v_cache, slots.to(torch.int32))
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_cache_write_then_attend():
    """Write whole contexts through slots computed from shuffled block tables, read them back, decode."""
    gen = torch.Generator().manual_seed(11)
    block_size = 8
    q, k_cache, v_cache, block_tables, seq_lens = make_problem(gen, [9, 20], 4, 2, 64, block_size, torch.float32)
    k_cache.zero_(), v_cache.zero_()
    for s, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(n, device=DEVICE)
        slots = block_tables[s, pos // block_size].long() * block_size + pos % block_size
        k, v = (torch.randn(n, 2, 64, generator=gen).to(DEVICE) for _ in range(2))
        cache_write(k, v, k_cache, v_cache, slots)
        blocks = block_tables[s, pos // block_size].long()
        assert torch.equal(k_cache[blocks, pos % block_size], k) and torch.equal(v_cache[blocks, pos % block_size], v)
    check("v2", (q, k_cache, v_cache, block_tables, seq_lens))


# ---------------------------------------------------------------- bad inputs


def _good():
    gen = torch.Generator().manual_seed(0)
    return make_problem(gen, [5, 9], 4, 2, 64, 8, torch.float32)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p.__setitem__(0, p[0][:, :, None]), "q must be"),
        (lambda p: p.__setitem__(2, p[2][:-1]), "k_cache and v_cache must both be"),
        (lambda p: p.__setitem__(0, p[0].double()), "share one dtype"),
        (lambda p: p.__setitem__(3, p[3].long()), "int32"),
        (lambda p: p.__setitem__(4, p[4][:1]), "seq_lens must be"),
        (lambda p: p.__setitem__(4, torch.zeros_like(p[4])), "at least the token"),
        (lambda p: p.__setitem__(0, p[0][:, :3]), "multiple of num_kv_heads"),
        (lambda p: p.__setitem__(0, p[0][..., :48]), "head_dim"),
    ],
)
def test_bad_inputs_raise_value_error(mutate, message):
    problem = _good()
    mutate(problem)
    if "at least" in message and ON_GPU:
        pytest.skip("value checks run on the CPU only (on the GPU they would stall the launch queue)")
    with pytest.raises(ValueError, match=message):
        paged_attention(*problem)


def test_bad_version_and_launch_settings():
    problem = _good()
    with pytest.raises(ValueError, match="version must be"):
        paged_attention(*problem, version="v5")
    with pytest.raises(ValueError, match="unknown launch settings"):
        paged_attention(*problem, version="v2", BLOCK_M=16)
    with pytest.raises(ValueError, match="multiple of BLOCK_N"):
        paged_attention(*problem, version="v3", BLOCK_N=16, partition_size=24)
    with pytest.raises(ValueError, match="unknown launch settings"):
        paged_attention(*problem, version="v3", MERGE_P=16)  # v3's reduce kernel sizes its own chunks
    with pytest.raises(ValueError, match="MERGE_P must be a power of two"):
        paged_attention(*problem, version="v4", MERGE_P=12)


def test_cache_write_bad_inputs():
    k_cache = torch.zeros(4, 8, 2, 64, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k = torch.zeros(3, 2, 64, device=DEVICE)
    slots = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match="num_tokens, num_kv_heads, head_dim"):
        cache_write(k[None], k[None], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="share one dtype"):
        cache_write(k.half(), k.half(), k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        cache_write(k, k, k_cache, v_cache, slots.float())
    with pytest.raises(ValueError, match=r"\(num_kv_heads, head_dim\)"):
        cache_write(k[:, :1], k[:, :1], k_cache, v_cache, slots)
    if not ON_GPU:
        with pytest.raises(ValueError, match="slot_mapping values"):
            cache_write(k, k, k_cache, v_cache, torch.tensor([0, 1, 32]))
