"""KV-cache quantisation: the quantise-on-write kernel, the dequantising paged decode kernel, and the
engine's QuantizedKVStore the model runs with (labkit/engine/kv_store_quant.py).

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
from labkit.engine import EngineConfig, LLMEngine, SamplingParams
from labkit.engine.kv_store_quant import QuantizedKVStore
from labkit.kv_cache import ContiguousCache
from labkit.kv_quant import (heldout_perplexities, kv_bytes_per_token, make_store, max_concurrent_sequences,
                             store_logits, teacher_forced_agreement)
from labkit.model import LlamaForCausalLM

DEVICE = labkit.DEVICE
ON_GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if ON_GPU else [])
# fp16 / bf16 queries take the decode kernel's fp16 path (codes decoded from their bits): tested on the CPU too
QUERY_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # kernel vs reference on the same codes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models: one thread is fastest, and on a shared machine more threads only make it slower."""
    from labkit.side_channel import one_thread

    with one_thread():
        yield


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


# --- the engine's quantised store -------------------------------------------------------------------
class FakeQuantCache(ContiguousCache):
    """The independent reference: a contiguous fp32 cache that stores each new K/V vector quantised and
    dequantised again (quantise_kv_ref per (token, KV head)); no blocks, no slots, no scales kept."""

    def __init__(self, config, max_len, fmt):
        super().__init__(config, 1, max_len)
        self.fmt = fmt

    def attend(self, layer_idx, q, k, v, positions):
        k = dequantise_kv_ref(*quantise_kv_ref(k, self.fmt)).to(k.dtype)
        v = dequantise_kv_ref(*quantise_kv_ref(v, self.fmt)).to(v.dtype)
        return super().attend(layer_idx, q, k, v, positions)


def tiny_model(seed=0, head_dim=16):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=101, hidden_size=4 * head_dim, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    for p in m.parameters():  # a wider spread of logits than the default init: no near-ties in argmax
        p.data.normal_(0, 0.3)
    return m


def prompts(n=5, vocab=101):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def serve(model, cfg, reqs, poison=False):
    """Run the engine; with ``poison`` every free block (device and swap space) is overwritten after each step
    with codes 0x7f and NaN scales, so a sequence only gets its K/V back by really moving or recomputing them."""
    engine = LLMEngine(model, cfg, eos_token_ids=())
    seqs = [engine.add_request(p, SamplingParams(max_tokens=n)) for p, n in reqs]
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        assert steps < 2000
        if poison:
            store, bm = engine.runner.store, engine.block_manager
            free = [b for b in range(bm.num_blocks) if bm.ref_count[b] == 0]
            for codes, scales in ((store.k_codes, store.k_scale), (store.v_codes, store.v_scale)):
                codes[:, free] = codes.new_full((), 0x7F) if codes.dtype == torch.int8 else 448.0
                scales[:, free] = float("nan")
            if engine.runner.cpu_k is not None:
                cpu_free = bm.cpu.free_block_ids()
                engine.runner.cpu_k[:, cpu_free] = 0xFF  # the scale bytes of 0xFFFFFFFF are a NaN
                engine.runner.cpu_v[:, cpu_free] = 0xFF
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return engine, [s.output_token_ids for s in seqs]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_engine_with_quantised_store_matches_the_dequantised_reference(fmt):
    """Every request gets exactly the greedy tokens of generate() over a fake-quantised contiguous cache:
    same codes, same scales, whatever the blocks, chunks and batch."""
    model = tiny_model()
    reqs = [(p, 12) for p in prompts()]
    cfg = EngineConfig(num_blocks=40, block_size=4, kv_cache_dtype=fmt, max_num_batched_tokens=16)
    engine, got = serve(model, cfg, reqs)
    assert isinstance(engine.runner.store, QuantizedKVStore)
    for (p, n), tokens in zip(reqs, got):
        assert tokens == generate(model, p, n, cache=FakeQuantCache(model.config, len(p) + n, fmt)).token_ids


@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", ["swap", "recompute"])
def test_preempted_requests_keep_their_codes_and_scales(policy):
    """A pool too small for all at once, free blocks poisoned after every step: swap must carry each block's
    scales out and back (they live inside the block), recompute must rebuild them; the tokens stay those of
    a run with room for everyone."""
    model = tiny_model(1)
    reqs = [(p, 16) for p in prompts(6)]
    roomy = EngineConfig(num_blocks=80, block_size=4, kv_cache_dtype="int8")
    _, want = serve(model, roomy, reqs)
    tight = EngineConfig(num_blocks=14, block_size=4, kv_cache_dtype="int8", preemption=policy,
                         num_cpu_blocks=40 if policy == "swap" else 0, watermark=0.0)
    engine, got = serve(model, tight, reqs, poison=True)
    assert got == want
    assert sum(len(r.preempted) for r in engine.history) > 0, "the pool was meant to be too small"
    if policy == "swap":
        out = sum(r.swapped_out_blocks for r in engine.history)
        assert out == sum(r.swapped_in_blocks for r in engine.history) > 0


def test_copy_on_write_copies_codes_and_scales():
    model = tiny_model()
    store = QuantizedKVStore(model.config, num_blocks=6, block_size=4, kv_cache_dtype="int8")
    store_logits(model, store, torch.randint(0, 101, (1, 8)))  # blocks 0 and 1 written
    store.copy_blocks([(1, 4)])
    assert torch.equal(store.k_codes[:, 4], store.k_codes[:, 1]) and torch.equal(store.v_scale[:, 4], store.v_scale[:, 1])
    assert store.k_scale[:, 1].abs().sum() > 0


def test_store_bytes_count_the_scales():
    model = tiny_model()
    store = QuantizedKVStore(model.config, num_blocks=10, block_size=4, kv_cache_dtype="fp8")
    assert store.bytes_per_block == 4 * kv_bytes_per_token(model.config, "fp8")
    assert store.bytes_per_token * 2 * 16 < 2 * 16 * kv_bytes_per_token(model.config, "fp16")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        QuantizedKVStore(model.config, 4, 4, "int4")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_kernel_decode_matches_torch_decode(fmt):
    """The store's GPU path (write kernel + dequantising decode kernel; in the interpreter here) gives the
    logits of its torch path from the same cache. fp8 writes go through torch on the CPU either way."""
    from labkit.engine.kv_store import AttentionMetadata

    model = tiny_model(2).to(DEVICE)
    x = torch.randint(0, 101, (2, 9))
    stores = {k: QuantizedKVStore(model.config, 8, 8, fmt, device=DEVICE, use_kernels=k) for k in (False, True)}
    store_logits(model, stores[False], x)  # prefill (torch path): blocks 0-1 and 2-3
    stores[True].k_cache.copy_(stores[False].k_cache)
    stores[True].v_cache.copy_(stores[False].v_cache)
    out = {}
    for k, store in stores.items():  # one decode step for both sequences: position 9 goes to slot 9 / 25
        store.metadata = AttentionMetadata.build([1, 1], [10, 10], [[0, 1], [2, 3]], [9, 25], DEVICE,
                                                 with_torch_path=not k)
        ids = torch.tensor([[5, 6]], device=DEVICE)
        out[k] = model(ids, torch.tensor([[9, 9]], device=DEVICE), cache=store, validate=False)
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-4)
    assert torch.equal(stores[True].k_codes[:, 1, 1].cpu(), stores[False].k_codes[:, 1, 1].cpu())


def test_store_prefill_logits_are_close_to_no_cache():
    model = tiny_model()
    x = torch.randint(0, 101, (3, 21))
    with torch.no_grad():
        ref = model(x)
        fp = store_logits(model, make_store(model.config, 18, 8, "auto"), x)
        q = store_logits(model, make_store(model.config, 18, 8, "int8"), x)
    torch.testing.assert_close(fp, ref, rtol=1e-5, atol=1e-5)  # the fp store changes nothing
    assert 0 < rel_err(q, ref) < 2e-2  # int8 changes a little


@pytest.mark.timeout(120)
def test_shipped_model_int8_kv_agrees_with_fp32_and_barely_moves_perplexity():
    """The lab's model on held-out text: teacher-forced greedy tokens agree with fp32 at >= 98% (int8) and
    >= 95% (fp8) of positions; held-out perplexity moves by < 0.5% (measured at writing: 99.9% / 98.5% agreement,
    -0.03% / +0.04% perplexity over 2,048 tokens)."""
    from labkit.checkpoint import load_default_model
    from labkit.evaluate import encode_split

    model, tok = load_default_model()
    ids = encode_split(tok)[:1025]
    x = ids[:1024].view(4, 256)
    assert teacher_forced_agreement(model, x, "int8") >= 0.98
    assert teacher_forced_agreement(model, x, "fp8") >= 0.95
    ppl = heldout_perplexities(model, ids, formats=("none", "int8"), batch_size=2)
    assert abs(ppl["int8"] / ppl["none"] - 1) < 5e-3


def test_bytes_and_capacity():
    cfg = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                      head_dim=128, intermediate_size=14336, vocab_size=128256)  # Llama-3-8B's attention shape
    assert kv_bytes_per_token(cfg, "fp16") == 2 * 32 * 8 * 128 * 2 == cfg.kv_bytes_per_token(2)
    assert kv_bytes_per_token(cfg, "int8") == 2 * 32 * 8 * (128 + 4)
    pool = 40 * 2**30
    fp16 = max_concurrent_sequences(cfg, pool, 4096, "fp16")
    int8 = max_concurrent_sequences(cfg, pool, 4096, "int8")
    assert fp16 == 80 and 1.9 < int8 / fp16 < 2.0
    with pytest.raises(ValueError, match="kv_format"):
        kv_bytes_per_token(cfg, "int4")
