"""Preemption (labkit.preemption): a preempted and resumed request yields exactly its uninterrupted
tokens, with a real (tiny, random, fp32) LlamaForCausalLM and real K/V tensors moved for swap."""
from __future__ import annotations

import pytest
import torch

from labkit.config import LlamaConfig
from labkit.generate import generate
from labkit.model import LlamaForCausalLM
from labkit.preemption import Engine, Request, StepCostModel

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


def make_requests(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, 24, (n,), generator=g).tolist()
    return [Request(i, torch.randint(0, CONFIG.vocab_size, (L,), generator=g).tolist(), NEW_TOKENS) for i, L in enumerate(lens)]


def run_poisoned(engine, requests):
    """engine.run, but after every step fill every free block (device and swap space) with NaN, so a
    resumed request can only get its K/V back by really copying or recomputing it."""
    for r in requests:
        engine.add(r)
    while engine.waiting or engine.running or engine.swapped:
        engine.step()
        free = [b for b in range(engine.bm.num_blocks) if engine.bm.ref_count[b] == 0]
        engine.kv.k[:, free] = engine.kv.v[:, free] = float("nan")
        if engine.cpu_k is not None:
            cpu_free = engine.cpu_allocator.free_block_ids()
            engine.cpu_k[:, cpu_free] = engine.cpu_v[:, cpu_free] = float("nan")
    return sorted(engine.finished, key=lambda r: r.req_id)


@pytest.fixture(scope="module")
def uninterrupted(model):
    engine = Engine(model, num_blocks=256, block_size=4)
    out = engine.run(make_requests())
    assert engine.stats["preemptions"] == 0
    return {r.req_id: r.output_ids for r in out}


def test_engine_matches_plain_generate(model, uninterrupted):
    for r in make_requests()[:2]:
        assert generate(model, r.prompt_ids, NEW_TOKENS).token_ids == uninterrupted[r.req_id]


@pytest.mark.parametrize("policy", ["recompute", "swap"])
def test_preempted_requests_produce_the_uninterrupted_tokens(model, uninterrupted, policy):
    engine = Engine(model, num_blocks=12, block_size=4, policy=policy)  # too few blocks for all six at once
    out = run_poisoned(engine, make_requests())
    assert engine.stats["preemptions"] > 0, "the pool was meant to be too small: nothing was preempted"
    assert {r.req_id: r.output_ids for r in out} == uninterrupted
    assert any(r.num_preemptions for r in out)
    assert out[0].num_preemptions == 0, "FCFS: the first arrival is never the victim while others run"
    if policy == "swap":
        assert engine.stats["swap_out_bytes"] == engine.stats["swap_in_bytes"] > 0
        assert engine.stats["recomputed_tokens"] == 0
    else:
        assert engine.stats["recomputed_tokens"] > 0 and engine.stats["swap_out_bytes"] == 0
    assert engine.bm.num_free_blocks == engine.bm.num_blocks, "every block returned at the end"
    assert engine.cpu_allocator.num_free_blocks == engine.cpu_allocator.num_blocks


def test_swap_space_full_falls_back_to_recompute(model, uninterrupted):
    engine = Engine(model, num_blocks=12, block_size=4, policy="swap", num_cpu_blocks=2)
    out = run_poisoned(engine, make_requests())
    assert engine.stats["swap_fallbacks"] > 0
    assert {r.req_id: r.output_ids for r in out} == uninterrupted


def test_prefix_caching_engine_gives_the_same_tokens(model, uninterrupted):
    reqs = make_requests()
    shared = reqs[0].prompt_ids[:8]
    for r in reqs[1:]:  # give every prompt the same first 8 tokens: two shared blocks
        r.prompt_ids = shared + r.prompt_ids[8:]
    ref = {r.req_id: r.output_ids for r in Engine(model, num_blocks=256, block_size=4).run(
        [Request(r.req_id, list(r.prompt_ids), NEW_TOKENS) for r in reqs])}
    engine = Engine(model, num_blocks=12, block_size=4, prefix_caching=True, policy="recompute")
    out = engine.run(reqs)
    assert {r.req_id: r.output_ids for r in out} == ref
    assert engine.bm.hit_rate > 0


def test_bookkeeping_only_engine_under_pressure():
    cost = StepCostModel(overhead_s=1e-3, per_token_s=1e-5, swap_bytes_per_s=1e9)
    reqs = [Request(i, [1] * (10 + i), 30, arrival_s=0.001 * i) for i in range(20)]
    results = {}
    for policy in ("recompute", "swap"):
        engine = Engine(None, config=CONFIG, cost=cost, num_blocks=40, block_size=4, policy=policy)
        done = engine.run([Request(r.req_id, list(r.prompt_ids), r.max_new_tokens, r.arrival_s) for r in reqs])
        assert len(done) == 20 and all(len(r.output_ids) == 30 for r in done)
        assert engine.stats["preemptions"] > 0 and engine.bm.num_free_blocks == 40
        results[policy] = engine.summary()
    assert results["recompute"]["recompute_flops"] > 0 and results["swap"]["swap_bytes"] > 0


def test_request_that_can_never_fit_is_refused():
    cost = StepCostModel(1e-3, 1e-5, 1e9)
    engine = Engine(None, config=CONFIG, cost=cost, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="could never finish"):
        engine.add(Request(0, [1] * 10, 10))
