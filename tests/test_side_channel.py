"""The prefix-cache timing side channel (labkit.side_channel) on the engine, and isolation of freed blocks."""
from __future__ import annotations

import pytest
import torch

import labkit  # noqa: F401
from labkit.config import LlamaConfig
from labkit.engine import EngineConfig, LLMEngine, SamplingParams
from labkit.kv_quant import make_store, store_logits
from labkit.model import LlamaForCausalLM
from labkit.prefix_cache import PrefixCachingBlockManager
from labkit.side_channel import PrefillCostModel, repeat_attack, roc_auc, roc_curve, run_attack

COST = PrefillCostModel(overhead_s=2e-3, per_token_s=1e-4)  # fixed here, so the test is deterministic
TINY = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models: one thread is fastest, and on a shared machine more threads only make it slower."""
    from labkit.side_channel import one_thread

    with one_thread():
        yield


def test_roc_auc():
    assert roc_auc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert roc_auc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5
    fpr, tpr = roc_curve([3, 2, 1, 0], [1, 0, 1, 0])
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_attack_on_the_engine_works_on_a_shared_cache_and_fails_with_a_salt():
    # 16 uncached tokens cost 1.6 ms; noise 0.5 ms: the hit is visible
    open_ = run_attack(300, salted=False, cost=COST, noise_s=5e-4, seed=0)
    salted = run_attack(300, salted=True, cost=COST, noise_s=5e-4, seed=0)
    assert open_["accuracy"] > 0.9 and open_["auc"] > 0.95
    assert abs(salted["accuracy"] - 0.5) < 0.08 and abs(salted["auc"] - 0.5) < 0.1
    noisy = run_attack(300, salted=False, cost=COST, noise_s=2e-2, seed=0)  # noise 12x the signal
    assert noisy["auc"] < 0.75


def test_repeats_report_their_spread():
    r = repeat_attack(3, 40, cost=COST, noise_s=1e-3)
    assert len(r[False]["auc"]) == 3 and r[False]["min_auc"] <= r[False]["median_auc"] <= r[False]["max_auc"]
    assert r[False]["median_auc"] > r[True]["median_auc"]


@pytest.mark.timeout(120)
def test_attack_with_real_cpu_timing_runs_on_the_engine():
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).eval()
    r = run_attack(6, clock="cpu", model=model, seed=1)
    assert r["clock"] == "cpu" and len(r["scores"]) == 6 and (r["scores"] < 0).all()


def test_salt_changes_what_the_probe_hits():
    bm = PrefixCachingBlockManager(32, 4)
    secret = list(range(12))
    bm.allocate("v", 13, token_ids=secret + [0], cache_salt="victim")
    bm.free("v")
    assert bm.match_prefix(secret + [5], cache_salt="attacker") == []
    assert len(bm.match_prefix(secret + [5], cache_salt="victim")) == 3


def test_bad_attack_arguments():
    with pytest.raises(ValueError, match="PrefillCostModel"):
        run_attack(10)
    with pytest.raises(ValueError, match="model"):
        run_attack(10, clock="cpu")
    with pytest.raises(ValueError, match="clock"):
        run_attack(10, clock="gpu", cost=COST)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_freed_blocks_poisoned_with_nan_are_never_read(prefix_caching):
    """After every step, fill every free block (that no prefix-cache hash names) with NaN. Later
    requests reuse those blocks; their outputs must stay finite and equal a fresh run's."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).eval()
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 128, (8,), generator=g).tolist()
    g2 = torch.Generator().manual_seed(4)
    prompts = [shared + torch.randint(0, 128, (3 + i,), generator=g2).tolist() for i in range(6)]
    params = SamplingParams(max_tokens=10)

    def serve(cfg, poison):
        engine = LLMEngine(model, cfg, eos_token_ids=())
        seqs = [engine.add_request(p, params) for p in prompts]
        store, bm = engine.runner.store, engine.block_manager
        poisoned, reused = set(), set()
        while engine.has_unfinished():
            engine.step()
            if not poison:
                continue
            for s in engine.scheduler.running:
                reused.update(poisoned & set(s.block_table))
            hashed = bm.bm.block_hash
            free = [b for b in range(bm.num_blocks) if bm.ref_count[b] == 0 and b not in hashed]
            store.k_cache[:, free] = float("nan")
            store.v_cache[:, free] = float("nan")
            poisoned.update(free)
        return [s.output_token_ids for s in seqs], reused

    fresh, _ = serve(EngineConfig(num_blocks=128, block_size=4), poison=False)
    out, reused = serve(EngineConfig(num_blocks=10, block_size=4, enable_prefix_caching=prefix_caching,
                                     max_num_seqs=3), poison=True)
    assert len(reused) >= 3, "the test must make later requests reuse poisoned blocks"
    assert out == fresh


def test_store_never_reads_poisoned_slots_of_a_partial_block():
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).eval()
    x = torch.randint(0, TINY.vocab_size, (1, 6))  # 2 blocks of 4: the second holds 2 tokens, 2 slots unused
    with torch.no_grad():
        fresh = store_logits(model, make_store(TINY, 8, 4, "auto"), x)
        store = make_store(TINY, 8, 4, "auto")
        store.k_cache[:] = float("nan")
        store.v_cache[:] = float("nan")
        out = store_logits(model, store, x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, fresh)
