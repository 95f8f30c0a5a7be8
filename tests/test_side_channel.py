"""The prefix-cache timing side channel (labkit.side_channel) and isolation of freed blocks."""
from __future__ import annotations

import pytest
import torch

from labkit.config import LlamaConfig
from labkit.model import LlamaForCausalLM
from labkit.prefix_cache import PrefillCostModel, PrefixCachingBlockManager
from labkit.preemption import Engine, Request
from labkit.side_channel import roc_auc, roc_curve, run_attack

COST = PrefillCostModel(overhead_s=2e-3, per_token_s=1e-4)  # fixed here, so the test is deterministic


def test_roc_auc():
    assert roc_auc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert roc_auc([1, 1, 1, 1], [1, 0, 1, 0]) == 0.5
    fpr, tpr = roc_curve([3, 2, 1, 0], [1, 0, 1, 0])
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_attack_works_on_a_shared_cache_and_fails_with_a_salt():
    # 16 uncached tokens cost 1.6 ms; noise 0.5 ms: the hit is visible
    open_ = run_attack(300, salted=False, cost=COST, noise_s=5e-4, seed=0)
    salted = run_attack(300, salted=True, cost=COST, noise_s=5e-4, seed=0)
    assert open_["accuracy"] > 0.9 and open_["auc"] > 0.95
    assert abs(salted["accuracy"] - 0.5) < 0.08 and abs(salted["auc"] - 0.5) < 0.1


def test_salt_changes_what_the_probe_hits():
    bm = PrefixCachingBlockManager(32, 4)
    secret = list(range(12))
    bm.allocate("v", 13, token_ids=secret + [0], cache_salt="victim")
    bm.free("v")
    assert bm.match_prefix(secret + [5], cache_salt="attacker") == []
    assert len(bm.match_prefix(secret + [5], cache_salt="victim")) == 3


TINY = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_freed_blocks_poisoned_with_nan_are_never_read(prefix_caching):
    """After every step, fill every free block (that no prefix-cache hash names) with NaN. Later
    requests reuse those blocks; their outputs must stay finite and equal a fresh run's."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).eval()
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 128, (8,), generator=g).tolist()

    def requests():
        g2 = torch.Generator().manual_seed(4)
        return [Request(i, shared + torch.randint(0, 128, (3 + i,), generator=g2).tolist(), 10, arrival_s=0.0)
                for i in range(6)]

    fresh = {r.req_id: r.output_ids for r in Engine(model, num_blocks=128, block_size=4).run(requests())}
    engine = Engine(model, num_blocks=10, block_size=4, prefix_caching=prefix_caching, max_num_seqs=3)
    for r in requests():
        engine.add(r)
    poisoned, reused = set(), set()
    while engine.waiting or engine.running or engine.swapped:
        engine.step()
        for r in engine.running:
            reused.update(poisoned & set(engine.bm.block_table(r.req_id)))
        hashed = getattr(engine.bm, "block_hash", {})
        free = [b for b in range(engine.bm.num_blocks) if engine.bm.ref_count[b] == 0 and b not in hashed]
        engine.kv.k[:, free] = float("nan")
        engine.kv.v[:, free] = float("nan")
        poisoned.update(free)
        for r in engine.running:  # every live token's K/V is finite
            slots = torch.tensor(engine.bm.slot_mapping(r.req_id))
            assert torch.isfinite(engine.kv.k.flatten(1, 2)[:, slots]).all()
    out = {r.req_id: r.output_ids for r in engine.finished}
    assert len(reused) >= 3, "the test must make later requests reuse poisoned blocks"
    assert out == fresh


def test_paged_cache_never_reads_poisoned_freed_slots():
    from labkit.paged_cache import PagedCache

    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).eval()
    ids = torch.randint(0, TINY.vocab_size, (1, 6))
    with torch.no_grad():
        fresh = model(ids, cache=PagedCache(TINY, num_blocks=8, block_size=4, backend="torch"))
        cache = PagedCache(TINY, num_blocks=8, block_size=4, backend="torch")
        model(torch.randint(0, TINY.vocab_size, (1, 9)), cache=cache)  # sequence 0 takes 3 blocks
        cache.free(0)
        free = [b for b in range(8) if cache.block_manager.ref_count[b] == 0]
        cache.k_cache[:, free] = float("nan")
        cache.v_cache[:, free] = float("nan")
        out = model(ids, cache=cache)  # sequence 0 again: reuses the poisoned blocks, 2 of 8 slots unused
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, fresh)
