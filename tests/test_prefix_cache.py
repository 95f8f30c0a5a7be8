"""Prefix caching (labkit.prefix_cache): hash chain, hits, LRU eviction, salts, parallel sampling; and the
shared-system-prompt trace on the engine (labkit.prefix_sharing)."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from labkit.paged import NoFreeBlocksError
from labkit.prefix_cache import PrefixCachingBlockManager, block_hashes, hash_block, parallel_sampling_blocks
from labkit.prefix_sharing import make_shared_prompt_trace, serve_shared_prompts


def test_hash_chain_depends_on_everything_before():
    a = block_hashes(list(range(40)), 8)
    assert len(a) == 5  # full blocks only
    b = block_hashes([99] + list(range(1, 40)), 8)
    assert all(x != y for x, y in zip(a, b)), "changing token 0 must change every later block's hash"
    assert a[0] == hash_block(None, range(8)) and a[1] == hash_block(a[0], range(8, 16))
    assert block_hashes(list(range(40)), 8, salt="t1")[0] != a[0]
    assert block_hashes(list(range(7)), 8) == []


def test_second_request_hits_the_shared_prefix():
    bm = PrefixCachingBlockManager(num_blocks=16, block_size=4)
    system = list(range(100, 112))  # 3 full blocks
    bm.allocate("a", 14, token_ids=system + [1, 2])
    assert bm.num_cached_tokens("a") == 0
    bm.allocate("b", 15, token_ids=system + [7, 8, 9])
    assert bm.num_cached_tokens("b") == 12
    assert bm.block_table("b")[:3] == bm.block_table("a")[:3]
    assert [bm.ref_count[x] for x in bm.block_table("a")[:3]] == [2, 2, 2]
    assert bm.hit_rate == pytest.approx(12 / 29)


def test_full_hit_still_computes_the_last_token():
    bm = PrefixCachingBlockManager(num_blocks=8, block_size=4)
    toks = list(range(8))
    bm.allocate("a", 8, token_ids=toks)
    bm.allocate("b", 8, token_ids=toks)
    assert bm.num_cached_tokens("b") == 4  # block 1 holds the last token: recomputed, in a new block
    assert bm.block_table("b")[1] != bm.block_table("a")[1]


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = PrefixCachingBlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 3, token_ids=[1, 2, 3])  # blocks: [1,2] full (cached), [3] partial
    bm.free("a")
    bm.allocate("b", 3, token_ids=[1, 2, 9])
    assert bm.num_cached_tokens("b") == 2  # hit on a block nobody held (ref_count 0 -> 1)
    bm.free("b")
    # fill the pool with other tokens: the cached block is evicted (LRU) only when needed
    bm.allocate("c", 8, token_ids=list(range(50, 58)))
    assert bm.stats["evictions"] >= 1 and bm.match_prefix([1, 2, 9]) == []


def test_allocation_failure_with_hits_changes_nothing():
    bm = PrefixCachingBlockManager(num_blocks=3, block_size=2)
    bm.allocate("a", 3, token_ids=[1, 2, 3])
    bm.free("a")  # block of [1, 2] is cached and free
    bm.allocate("x", 2, token_ids=[8, 9])
    before = (list(bm.ref_count), bm.allocator.free_block_ids(), dict(bm.hash_to_block))
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("b", 7, token_ids=[1, 2, 3, 4, 5, 6, 7])  # needs 4 blocks, 1 of them a hit
    assert (list(bm.ref_count), bm.allocator.free_block_ids(), dict(bm.hash_to_block)) == before


def test_salt_isolates_tenants():
    bm = PrefixCachingBlockManager(num_blocks=16, block_size=4)
    toks = list(range(13))
    bm.allocate("victim", 13, token_ids=toks, cache_salt="victim")
    bm.allocate("attacker", 13, token_ids=toks, cache_salt="attacker")
    assert bm.num_cached_tokens("attacker") == 0
    bm.allocate("victim2", 13, token_ids=toks, cache_salt="victim")
    assert bm.num_cached_tokens("victim2") == 12


def test_decoded_blocks_are_cached_when_tokens_are_given():
    bm = PrefixCachingBlockManager(num_blocks=8, block_size=2)
    bm.allocate("a", 1, token_ids=[5])
    for t in [6, 7, 8]:
        bm.append_slot("a", token_id=t)
    bm.free("a")
    bm.allocate("b", 5, token_ids=[5, 6, 7, 8, 9])
    assert bm.num_cached_tokens("b") == 4


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 2, 4]))
def test_random_workload_never_leaks_and_cached_blocks_hold_their_tokens(seed, num_blocks, block_size):
    """Random requests over a small vocabulary (many shared prefixes): a block found by hash must hold
    exactly the tokens that hash names, and freeing everything returns every block."""
    rng = random.Random(seed)
    bm = PrefixCachingBlockManager(num_blocks, block_size)
    content: dict[int, tuple] = {}  # block -> tokens written there (a fake cache)
    tokens: dict[int, list[int]] = {}
    for i in range(40):
        if tokens and rng.random() < 0.4:
            victim = rng.choice(sorted(tokens))
            bm.free(victim)
            del tokens[victim]
            continue
        toks = [rng.randrange(3) for _ in range(rng.randint(1, 3 * block_size + 1))]
        if not bm.can_allocate(len(toks)):
            continue
        bm.allocate(i, len(toks), token_ids=toks, cache_salt=rng.choice([None, "t"]))
        table, cached = bm.block_table(i), bm.num_cached_tokens(i)
        for j, b in enumerate(table):  # prefill writes every block after the cached ones
            if j * block_size >= cached:
                content[b] = tuple(toks[j * block_size:(j + 1) * block_size])
            else:
                assert content[b] == tuple(toks[j * block_size:(j + 1) * block_size]), "hit on a wrong block"
        tokens[i] = toks
        held = [0] * num_blocks
        for s in bm.seqs.values():
            for b in s.block_table:
                held[b] += 1
        assert held == bm.ref_count
    for s in list(tokens):
        bm.free(s)
    assert bm.ref_count == [0] * num_blocks and bm.num_free_blocks == num_blocks


@pytest.mark.timeout(120)
def test_shared_system_prompts_on_the_engine_hit_rate_ttft_and_salt_cost():
    trace = make_shared_prompt_trace(num_requests=60, system_len=256, seed=1)
    plain = serve_shared_prompts(trace, num_blocks=256, prefix_caching=False)
    cached = serve_shared_prompts(trace, num_blocks=256)
    salted = serve_shared_prompts(trace, num_blocks=256, per_tenant_salt=True)
    assert plain["hit_rate"] == 0 and 0.5 < cached["hit_rate"] < 1
    assert cached["prefill_tokens"] < 0.6 * plain["prefill_tokens"]
    assert cached["mean_ttft_s"] < plain["mean_ttft_s"]
    assert salted["hit_rate"] < cached["hit_rate"]  # per-tenant salt forfeits cross-tenant hits


def test_parallel_sampling_shares_the_prompt():
    r = parallel_sampling_blocks(prompt_len=100, output_lens=[20, 20, 20, 20], block_size=16)
    # 100 prompt tokens = 6 full blocks shared + 1 partial block copied by 3 of the 4 samples
    assert r["cow_copies"] == 3
    assert r["blocks_independent"] == 4 * 8 and r["blocks_shared"] == 6 + 4 * 2
    assert r["memory_saved"] == pytest.approx(1 - 14 / 32)


def test_parallel_sampling_with_real_kv_and_copy_on_write_equals_independent_runs():
    """n samples of one prompt share its blocks (fork) and decode in lockstep; each must produce what an
    independent run with the same seed produces. Without copy-on-write, the samples would overwrite each
    other's K/V in the shared partial block."""
    import torch

    from labkit.config import LlamaConfig
    from labkit.generate import generate, sample_next
    from labkit.model import LlamaForCausalLM
    from labkit.paged import BlockManager
    from labkit.engine.kv_store import AttentionMetadata, PagedKVStore

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    prompt = torch.randint(0, 128, (10,), generator=torch.Generator().manual_seed(1)).tolist()  # 2.5 blocks
    n, new = 3, 8
    bm, kv = BlockManager(32, 4), PagedKVStore(cfg, 32, 4)

    def bind(table, slots, seq_len):  # one sequence per forward: its new tokens at `slots`, reading `table`
        kv.metadata = AttentionMetadata.build([len(slots)], [seq_len], [table], slots, "cpu", with_torch_path=True)
        return kv

    with torch.no_grad():
        bm.allocate(0, len(prompt))
        logits = model(torch.tensor([prompt]), cache=bind(bm.block_table(0), bm.slot_mapping(0), len(prompt)))
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        outs = [[sample_next(logits[0, -1], 1.0, generator=gens[i])] for i in range(n)]
        for i in range(1, n):
            bm.fork(0, i)
        copies, last_logits = 0, {}
        for _ in range(new - 1):
            for i in range(n):  # lockstep: every sample writes into the shared partial block in turn
                slot = bm.append_slot(i)
                pending = bm.take_copies()
                copies += len(pending)
                kv.copy_blocks(pending)
                pos = bm.num_tokens(i) - 1
                bind(bm.block_table(i), [slot], pos + 1)
                logits = model(torch.tensor([[outs[i][-1]]]), torch.tensor([[pos]]), cache=kv)
                outs[i].append(sample_next(logits[0, -1], 1.0, generator=gens[i]))
                last_logits[i] = logits[0, -1]
    assert copies == n - 1
    for i in range(n):
        assert outs[i] == generate(model, prompt, new, temperature=1.0, seed=i).token_ids
        with torch.no_grad():  # and the K/V each sample read were its own: same logits as a cache-free run
            full = model(torch.tensor([prompt + outs[i][:-1]]))[0, -1]
        torch.testing.assert_close(last_logits[i], full, rtol=1e-4, atol=1e-5)
