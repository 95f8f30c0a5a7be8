"""Causal varlen prefill attention over a paged cache (kernels/prefill_attention.py) against plain torch.

The reference is itself checked against a float64 dense attention that never sees a block table. On the CPU
the kernel runs in Triton's interpreter, so shapes stay tiny; the GPU tests use realistic ones.
"""
from __future__ import annotations

import pytest
import torch

import labkit
from kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref

DEVICE = labkit.DEVICE
ON_GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # ||out - ref|| / ||ref||


def make_problem(gen, runs, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device=DEVICE):
    """runs: one (prefix, q_len) per sequence. Returns the kernel's six inputs and each sequence's dense (k, v).

    Each sequence's keys/values are drawn dense, then written into a shuffled set of physical blocks. All the
    kernel must not read is NaN: cache slots past seq_len, spare blocks, and the block that unused table
    entries point at. block_tables and q are strided views (a column slice, a head slice).
    """
    seq_lens = [prefix + q_len for prefix, q_len in runs]
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    wide = torch.full((len(runs), max(blocks_per_seq) + 3), -1, dtype=torch.int32)
    wide[:, :-1] = perm[-1]  # an all-NaN block: reading an unused entry shows up in the output
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)
    dense, used = [], 0
    for s, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        wide[s, :nb] = perm[used : used + nb]
        used += nb
        k, v = (torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
        pos = torch.arange(n)
        k_cache[wide[s, pos // block_size].long(), pos % block_size] = k
        v_cache[wide[s, pos // block_size].long(), pos % block_size] = v
        dense.append((k, v))
    q = torch.randn(sum(n for _, n in runs), num_q_heads + 1, head_dim, generator=gen)[:, 1:].to(dtype)
    cu = torch.tensor([0] + [n for _, n in runs], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    problem = [q, k_cache, v_cache, wide[:, :-1], cu, torch.tensor(seq_lens, dtype=torch.int32)]
    return [t.to(device) for t in problem], dense


def dense_attention_f64(q, dense, cu_seqlens_q, scale=None):
    """Float64 causal GQA attention from each sequence's dense (k, v): no block tables, no torch SDPA."""
    num_q_heads, head_dim = q.shape[1:]
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    cu = cu_seqlens_q.tolist()
    for s, (k, v) in enumerate(dense):
        kv_head = torch.arange(num_q_heads) // (num_q_heads // k.shape[1])  # query head h reads kv head h // group
        k, v = k.double()[:, kv_head], v.double()[:, kv_head]  # (L, Hq, D)
        q_s = q[cu[s] : cu[s + 1]].double().cpu()  # (Tq, Hq, D)
        scores = torch.einsum("thd,lhd->htl", q_s, k) * scale
        q_pos = len(k) - len(q_s) + torch.arange(len(q_s))  # the new queries are the last positions
        scores[:, torch.arange(len(k))[None, :] > q_pos[:, None]] = float("-inf")
        out[cu[s] : cu[s + 1]] = torch.einsum("htl,lhd->thd", scores.softmax(-1), v)
    return out


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite values in the output: garbage leaked or a row saw no key"
    return ((out.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


def check(problem, scale=None, **launch):
    q, k_cache, v_cache, *index = problem
    ref = paged_prefill_attention_ref(q.float(), k_cache.float(), v_cache.float(), *index, scale)
    out = paged_prefill_attention(*problem, scale, **launch)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = rel_err(out, ref)
    assert err < TOL[q.dtype], f"relative error {err:.2e} with {launch or 'the default tiles'}"


# (runs as (prefix, q_len), num_q_heads, num_kv_heads, head_dim, block_size): q_len 0 / 1 / many, prefixes
# 0 / mid-block / several blocks, block sizes 1 to 16, groups 1 / 2 / 3 / 4 / 32 (> BLOCK_ROWS on the CPU).
CASES = [
    ([(0, 9), (5, 1), (0, 0), (19, 6), (16, 16)], 4, 2, 32, 4),
    ([(0, 1), (3, 7), (12, 0), (0, 20)], 4, 1, 16, 1),
    ([(40, 3), (7, 12), (0, 5)], 2, 2, 16, 8),
    ([(9, 2), (0, 11), (33, 1)], 6, 2, 16, 16),
    ([(5, 3), (0, 0)], 32, 1, 16, 2),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(case, dtype):
    problem, _ = make_problem(torch.Generator().manual_seed(case), *CASES[case], dtype)
    check(problem)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_reference_matches_dense_float64(case):
    problem, dense = make_problem(torch.Generator().manual_seed(case), *CASES[case], torch.float32)
    ref = paged_prefill_attention_ref(*problem, scale=0.3)
    assert rel_err(ref, dense_attention_f64(problem[0], dense, problem[4], scale=0.3)) < 1e-6


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(3))
def test_random_batches_and_tiles(seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=gen))]  # noqa: E731
    runs = [(pick([0, 1, 7, 16, 30]), pick([0, 1, 2, 13, 24])) for _ in range(pick([1, 2, 4]))]
    num_kv_heads, group = pick([1, 2]), pick([1, 2, 4])
    problem, _ = make_problem(gen, runs, num_kv_heads * group, num_kv_heads, 16, pick([1, 4, 8, 16]), torch.float32)
    check(problem, scale=pick([None, 0.5]), BLOCK_ROWS=pick([16, 32]), BLOCK_N=pick([16, 32]))


@pytest.mark.timeout(60)
def test_same_shapes_any_split():
    """The grid depends on shapes only, so one launch shape serves every split of num_tokens (a CUDA graph
    captured once is replayed with other lengths): move 12 query tokens between 3 sequences of 20 cached."""
    problem, _ = make_problem(torch.Generator().manual_seed(7), [(8, 12), (20, 0), (20, 0)], 8, 2, 16, 4, torch.float32)
    for q_lens in ([12, 0, 0], [0, 0, 12], [5, 5, 2], [1, 10, 1]):
        problem[4] = torch.tensor([0] + q_lens, dtype=torch.int32, device=DEVICE).cumsum(0, dtype=torch.int32)
        check(problem)


@pytest.mark.timeout(60)
def test_garbage_past_seq_len_and_in_unused_table_entries_never_leaks():
    """Tiles of 32 keys over blocks of 4, sequences ending mid-block: every loaded tile overhangs NaN slots and
    unused table entries (pointing at an all-NaN block); none of it may reach the output."""
    problem, _ = make_problem(torch.Generator().manual_seed(3), [(6, 3), (0, 1), (13, 0)], 2, 1, 16, 4, torch.float32)
    assert problem[1].isnan().any() and problem[2].isnan().any()
    check(problem, BLOCK_N=32)


def _good():
    problem, _ = make_problem(torch.Generator().manual_seed(0), [(3, 4), (0, 2)], 4, 2, 16, 4, torch.float32)
    return problem


def _set(i, f):
    return lambda p: p.__setitem__(i, f(p))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "mutate, message",
    [
        (_set(0, lambda p: p[0][None]), "q must be"),
        (_set(2, lambda p: p[2][:-1]), "k_cache and v_cache must both be"),
        (_set(0, lambda p: p[0].double()), "share one dtype"),
        (_set(0, lambda p: p[0][:, :3]), "multiple of num_kv_heads"),
        (lambda p: p.__setitem__(slice(0, 3), [t[..., :8] for t in p[:3]]), "power of two >= 16"),
        (_set(3, lambda p: p[3].long()), "block_tables must be an int32"),
        (_set(4, lambda p: p[4].long()), "cu_seqlens_q must be an int32"),
        (_set(5, lambda p: p[5][:1]), "seq_lens must be an int32"),
        (_set(5, lambda p: torch.stack([p[5], p[5]], 1)[:, 0]), "must be contiguous"),
        (_set(4, lambda p: p[4] - p[4][1]), "cu_seqlens_q must start at 0"),  # values: checked on request
        (_set(5, lambda p: p[5] - 3), "every seq_len must be in"),
        (_set(3, lambda p: p[3] + 100), "points outside the cache"),
    ],
)
def test_bad_inputs_raise_value_error(mutate, message):
    problem = _good()
    mutate(problem)
    with pytest.raises(ValueError, match=message):
        paged_prefill_attention(*problem, check=True)


@pytest.mark.timeout(60)
def test_value_checks_can_be_switched_off_and_bad_launch_settings():
    problem = _good()
    problem[4] = torch.tensor([0, 4, 4], dtype=torch.int32, device=DEVICE)  # ends before num_tokens: not checked
    out = paged_prefill_attention(*problem, check=False)
    problem[0] = problem[0][:4]
    assert rel_err(out[:4], paged_prefill_attention_ref(*problem)) < TOL[torch.float32]
    with pytest.raises(ValueError, match="unknown launch settings"):
        paged_prefill_attention(*problem, BLOCK_M=16)
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        paged_prefill_attention(*problem, BLOCK_N=24)


# ---------------------------------------------------------------- GPU: realistic shapes (H200)
GPU_RUNS = [(0, 1000), (333, 517), (1024, 64), (2047, 1), (100, 0), (15, 999)]  # prompts, chunks, a decode row


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "dtype, head_dim, block_size",
    [(torch.float16, 128, 16), (torch.bfloat16, 128, 16), (torch.bfloat16, 64, 1), (torch.float16, 256, 16),
     (torch.float32, 128, 16)],
    ids=str,
)
def test_gpu_realistic_shapes(dtype, head_dim, block_size):
    problem, _ = make_problem(torch.Generator().manual_seed(head_dim), GPU_RUNS, 32, 8, head_dim, block_size, dtype)
    check(problem)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.timeout(300)
def test_gpu_cuda_graph_capture_and_replay_with_other_lengths():
    """Capture fails on any host sync; the replay then serves a different split of the same num_tokens."""
    problem, _ = make_problem(torch.Generator().manual_seed(1), GPU_RUNS, 32, 8, 128, 16, torch.bfloat16)
    paged_prefill_attention(*problem)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_prefill_attention(*problem)
    for q_lens in ([n for _, n in GPU_RUNS], [500, 850, 200, 1, 100, 930]):  # same seq_lens, other prefixes
        problem[4].copy_(torch.tensor([0] + q_lens).cumsum(0).to(torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_prefill_attention_ref(*(t.float() if t.is_floating_point() else t for t in problem))
        assert rel_err(out, ref) < TOL[torch.bfloat16], q_lens
