"""KV-cache quantisation: the quantise-on-write kernel, the dequantising paged decode kernel, and the
QuantizedPagedCache the model runs with.

On the CPU the kernels run in Triton's interpreter (tiny shapes, fp32 queries); with a CUDA device the
same tests also run with fp16 / bf16 queries, fp8 cache writes, and larger ragged batches.
"""
from __future__ import annotations

import pytest
import torch

import labkit
from kernels.paged_attention import paged_attention_ref
from kernels.paged_attention_int8kv import (
    KV_FORMATS,
    cache_write_quant,
    cache_write_quant_ref,
    dequantise_kv_ref,
    paged_attention_int8kv,
    paged_attention_int8kv_ref,
    quantise_kv_ref,
)
from labkit.config import LlamaConfig
from labkit.generate import generate
from labkit.kv_cache import NoCache
from labkit.kv_quant import QuantizedPagedCache, kv_bytes_per_token, max_concurrent_sequences
from labkit.model import LlamaForCausalLM

DEVICE = labkit.DEVICE
ON_GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if ON_GPU else [])
# fp16 / bf16 queries take the decode kernel's fp16 path (codes decoded from their bits): tested on the CPU too
QUERY_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # kernel vs reference on the same codes


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite values in the kernel's output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def make_cache(gen, num_blocks, block_size, num_kv_heads, head_dim, fmt):
    qdtype = KV_FORMATS[fmt][0]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # poison: codes that decode to large values and NaN scales, so an unwritten slot that is read shows up
    k_cache = torch.full(shape, 100, dtype=torch.int8) if fmt == "int8" else torch.full(shape, 100.0).to(qdtype)
    scales = torch.full(shape[:3], float("nan"))
    return [t.to(DEVICE) for t in (k_cache, k_cache.clone(), scales, scales.clone())]


# --- quantisation, reference ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantise_ref_error_bound(fmt):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, 32, generator=gen) * torch.logspace(-3, 2, 50)[:, None, None]  # wide range of scales
    x[0, 0] = 0.0
    codes, scale = quantise_kv_ref(x, fmt)
    assert codes.dtype == KV_FORMATS[fmt][0] and scale.shape == (50, 4)
    assert scale[0, 0] == 0 and codes[0, 0].float().abs().max() == 0  # all-zero vector: scale 0
    err = (dequantise_kv_ref(codes, scale) - x).abs()
    if fmt == "int8":
        assert (err <= scale[..., None] * 0.5 * (1 + 1e-5)).all()  # at most half a step
        assert codes.abs().max() == 127  # the largest |x| of each vector maps to +-127
    else:
        assert (err <= x.abs() * 2**-4 + scale[..., None] * 2**-9 * 1.0001).all()  # 3 mantissa bits (+ subnormals)


# --- cache write kernel ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_cache_write_matches_reference_bit_for_bit(fmt, block_size, dtype):
    if fmt == "fp8" and not ON_GPU:
        pytest.skip("Triton's interpreter converts fp32 -> fp8 e4m3 wrongly; fp8 writes are checked on the GPU")
    gen = torch.Generator().manual_seed(block_size)
    num_blocks, heads, dim, n = 6, 3, 32, 20
    caches = make_cache(gen, num_blocks, block_size, heads, dim, fmt)
    expected = [c.clone() for c in caches]
    k = (torch.randn(n, heads, dim, generator=gen) * 3).to(dtype).to(DEVICE)
    v = torch.randn(n, heads, dim, generator=gen).to(dtype).to(DEVICE)
    k[4] = 0  # an all-zero token
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n]
    slots[[2, 7]] = -1  # padding tokens are skipped
    slots = slots.to(DEVICE)
    cache_write_quant(k, v, *caches, slots)
    cache_write_quant_ref(k, v, *expected, slots)
    for got, want in zip(caches, expected):
        assert torch.equal(got.view(torch.uint8) if got.dtype != torch.float32 else got.nan_to_num(-1),
                           want.view(torch.uint8) if want.dtype != torch.float32 else want.nan_to_num(-1))


@pytest.mark.skipif(ON_GPU, reason="interpreter-only guard")
def test_fp8_write_in_the_interpreter_says_why_it_refuses():
    caches = make_cache(torch.Generator(), 2, 8, 1, 16, "fp8")
    with pytest.raises(NotImplementedError, match="cache_write_quant_ref"):
        cache_write_quant(torch.randn(1, 1, 16), torch.randn(1, 1, 16), *caches, torch.tensor([0]))


# --- decode kernel --------------------------------------------------------------------------------
def make_problem(gen, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, fmt):
    """Quantised caches written through shuffled, non-contiguous block tables (unused entries -1)."""
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(seq_lens), max(blocks_per_seq) + 1), -1, dtype=torch.int32)
    caches = make_cache(gen, num_blocks, block_size, num_kv_heads, head_dim, fmt)
    used, slots = 0, []
    for s, (n, nb) in enumerate(zip(seq_lens, blocks_per_seq)):
        tables[s, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
        slots += [int(tables[s, p // block_size]) * block_size + p % block_size for p in range(n)]
    k = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)
    v = torch.randn(len(slots), num_kv_heads, head_dim, generator=gen)
    k[:, :, 0] *= 8  # an outlier channel, as real keys have
    cache_write_quant_ref(k.to(DEVICE), v.to(DEVICE), *caches, torch.tensor(slots, device=DEVICE))
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    return q.to(DEVICE), caches, tables.to(DEVICE), torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), (k, v)


# (seq_lens, num_q_heads, num_kv_heads, head_dim, block_size): length 1, lengths ending mid-block,
# exact multiples of the block size, group sizes 1, 2 and 8.
CASES = [
    ([1, 7, 16], 4, 2, 16, 8),
    ([5, 33], 2, 2, 32, 16),
    ([20], 8, 1, 16, 4),
]


@pytest.mark.parametrize("dtype", QUERY_DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_matches_reference(case, fmt, dtype):
    seq_lens, hq, hkv, dim, block_size = CASES[case]
    gen = torch.Generator().manual_seed(case)
    q, caches, tables, lens, _ = make_problem(gen, seq_lens, hq, hkv, dim, block_size, dtype, fmt)
    out = paged_attention_int8kv(q, *caches, tables, lens)
    assert out.shape == q.shape and out.dtype == dtype
    ref = paged_attention_int8kv_ref(q.float(), *caches, tables, lens)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("fmt, bound", [("int8", 2e-2), ("fp8", 8e-2)])
def test_quantised_attention_stays_close_to_full_precision(fmt, bound):
    gen = torch.Generator().manual_seed(11)
    q, caches, tables, lens, (k, v) = make_problem(gen, [24, 9], 4, 2, 32, 8, torch.float32, fmt)
    out = paged_attention_int8kv(q, *caches, tables, lens)
    full = [torch.zeros(c.shape, dtype=torch.float32, device=DEVICE) for c in caches[:2]]  # unquantised caches
    from kernels.cache_write import cache_write_ref

    slots = torch.cat([tables[s, torch.arange(n, device=DEVICE) // 8].long() * 8 + torch.arange(n, device=DEVICE) % 8
                       for s, n in enumerate(lens.tolist())])
    cache_write_ref(k.to(DEVICE), v.to(DEVICE), *full, slots)
    exact = paged_attention_ref(q, *full, tables, lens)
    assert rel_err(out, exact) < bound


@pytest.mark.skipif(not ON_GPU, reason="larger shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_gpu_long_ragged_batch(fmt, dtype):
    gen = torch.Generator().manual_seed(5)
    seq_lens = torch.randint(1, 2048, (24,), generator=gen).tolist()
    q, caches, tables, lens, _ = make_problem(gen, seq_lens, 32, 8, 128, 16, dtype, fmt)
    out = paged_attention_int8kv(q, *caches, tables, lens)
    ref = paged_attention_int8kv_ref(q.float(), *caches, tables, lens)
    assert rel_err(out, ref) < TOL[dtype]


def test_decode_rejects_bad_input():
    gen = torch.Generator().manual_seed(0)
    q, caches, tables, lens, _ = make_problem(gen, [3], 2, 1, 16, 8, torch.float32, "int8")
    with pytest.raises(ValueError, match="int8 or float8"):
        paged_attention_int8kv(q, caches[0].float(), caches[1].float(), *caches[2:], tables, lens)
    with pytest.raises(ValueError, match="num_blocks, block_size, num_kv_heads"):
        paged_attention_int8kv(q, *caches[:2], caches[2][:, :1], caches[3], tables, lens)
    with pytest.raises(ValueError, match="int32"):
        paged_attention_int8kv(q, *caches, tables.long(), lens)
    with pytest.raises(ValueError, match="q must be"):
        paged_attention_int8kv(q[0], *caches, tables, lens)


# --- the cache the model runs with ----------------------------------------------------------------
def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("fmt, bound", [("int8", 1e-2), ("fp8", 4e-2)])
def test_prefill_logits_close_to_no_cache(fmt, bound):
    model = tiny_model()
    ids = torch.randint(0, 128, (3, 21))
    cache = QuantizedPagedCache.for_batch(model.config, 3, 32, block_size=8, kv_format=fmt, backend="torch")
    with torch.no_grad():
        ref, out = model(ids), model(ids, cache=cache)
    assert 0 < rel_err(out, ref) < bound  # changed (it is quantised), but only a little
    assert cache.block_manager.num_tokens(2) == 21


def test_kernel_backend_matches_torch_backend_when_decoding():
    model = tiny_model(1).to(DEVICE)
    prompt = torch.randint(0, 128, (6,)).tolist()
    runs = {}
    for backend in ("torch", "triton"):
        cache = QuantizedPagedCache.for_batch(model.config, 1, 32, block_size=8, backend=backend, device=DEVICE)
        runs[backend] = generate(model, prompt, 6, cache=cache).token_ids
    assert runs["torch"] == runs["triton"]


def test_decode_step_by_step_matches_full_prefill():
    model = tiny_model(2)
    ids = torch.randint(0, 128, (2, 12))
    full = QuantizedPagedCache.for_batch(model.config, 2, 16, block_size=4, backend="torch")
    stepped = QuantizedPagedCache.for_batch(model.config, 2, 16, block_size=4, backend="torch")
    with torch.no_grad():
        ref = model(ids, cache=full)
        last = [model(ids[:, :5], cache=stepped)[:, -1]]
        for t in range(5, 12):
            last.append(model(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=stepped)[:, -1])
    assert torch.allclose(torch.stack(last, 1), ref[:, 4:], atol=1e-5)  # the same codes either way


def test_positions_must_continue_the_sequence():
    model = tiny_model()
    cache = QuantizedPagedCache.for_batch(model.config, 1, 16, block_size=4, backend="torch")
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 5)), cache=cache)
        with pytest.raises(ValueError, match="only appends"):
            model(torch.randint(0, 128, (1, 1)), positions=torch.tensor([[7]]), cache=cache)


def test_bytes_and_capacity():
    cfg = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                      head_dim=128, intermediate_size=14336, vocab_size=128256)  # Llama-3-8B's attention shape
    assert kv_bytes_per_token(cfg, "fp16") == 2 * 32 * 8 * 128 * 2 == cfg.kv_bytes_per_token(2)
    assert kv_bytes_per_token(cfg, "int8") == 2 * 32 * 8 * (128 + 4)
    pool = 40 * 2**30
    fp16 = max_concurrent_sequences(cfg, pool, 4096, "fp16")
    int8 = max_concurrent_sequences(cfg, pool, 4096, "int8")
    assert fp16 == 80 and 1.9 < int8 / fp16 < 2.0
    model = tiny_model()
    cache = QuantizedPagedCache(model.config, num_blocks=10, block_size=4)
    assert cache.reserved_bytes == 10 * 4 * cache.bytes_per_token
    with pytest.raises(ValueError, match="kv_format"):
        kv_bytes_per_token(cfg, "int4")
