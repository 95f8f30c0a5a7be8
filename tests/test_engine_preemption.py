"""Preemption on the engine (notebook 07): a preempted and resumed request yields exactly its uninterrupted
tokens, with real K/V moved for swap and rebuilt for recompute; and the engine on the recorded GPU cost model
(SimulatedRunner) under memory pressure. (The randomised test in test_engine.py covers the policies broadly;
this file poisons what a resumed request must not read.)"""
from __future__ import annotations

import pytest
import torch

import labkit  # noqa: F401
from labkit.config import LlamaConfig
from labkit.engine import EngineConfig, LLMEngine, SamplingParams
from labkit.engine.simulated_runner import SimulatedRunner, recorded_gpu_runner
from labkit.generate import generate
from labkit.model import LlamaForCausalLM
from labkit.step_cost import StepCostModel

pytestmark = pytest.mark.timeout(180)
CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
NEW_TOKENS = 20


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models: one thread is fastest, and on a shared machine more threads only make it slower."""
    from labkit.side_channel import one_thread

    with one_thread():
        yield


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LlamaForCausalLM(CONFIG).eval()
    for p in m.parameters():  # no near-ties in argmax
        p.data.normal_(0, 0.3)
    return m


def make_requests(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, 24, (n,), generator=g).tolist()
    return [torch.randint(0, CONFIG.vocab_size, (L,), generator=g).tolist() for L in lens]


def run_poisoned(model, cfg):
    """Serve make_requests(); after every step fill every free block (device and swap space) with NaN, so a
    resumed request can only get its K/V back by really copying or recomputing them."""
    engine = LLMEngine(model, cfg, eos_token_ids=())
    seqs = [engine.add_request(p, SamplingParams(max_tokens=NEW_TOKENS)) for p in make_requests()]
    store, bm = engine.runner.store, engine.block_manager
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        engine.step()
        free = [b for b in range(bm.num_blocks) if bm.ref_count[b] == 0]
        store.k_cache[:, free] = store.v_cache[:, free] = float("nan")
        if engine.runner.cpu_k is not None:
            cpu_free = bm.cpu.free_block_ids()
            engine.runner.cpu_k[:, cpu_free] = engine.runner.cpu_v[:, cpu_free] = float("nan")
    assert not engine.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks and bm.cpu.num_free_blocks == bm.cpu.num_blocks
    return engine, seqs


@pytest.fixture(scope="module")
def uninterrupted(model):
    return [generate(model, p, NEW_TOKENS).token_ids for p in make_requests()]


@pytest.mark.parametrize("policy", ["recompute", "swap"])
def test_preempted_requests_produce_the_uninterrupted_tokens(model, uninterrupted, policy):
    cfg = EngineConfig(num_blocks=12, block_size=4, preemption=policy, num_cpu_blocks=48 if policy == "swap" else 0,
                       watermark=0.0)  # too few blocks for all six at once
    engine, seqs = run_poisoned(model, cfg)
    assert [s.output_token_ids for s in seqs] == uninterrupted
    assert any(s.num_preemptions for s in seqs), "the pool was meant to be too small: nothing was preempted"
    assert seqs[0].num_preemptions == 0, "FCFS: the first arrival is never the victim while others run"
    out = sum(r.swapped_out_blocks for r in engine.history)
    back = sum(r.swapped_in_blocks for r in engine.history)
    recomputed = sum(r.num_prefill_tokens for r in engine.history) - sum(len(p) for p in make_requests())
    if policy == "swap":
        assert out == back > 0 and recomputed == 0
    else:
        assert out == back == 0 and recomputed > 0


def test_swap_space_full_falls_back_to_recompute(model, uninterrupted):
    cfg = EngineConfig(num_blocks=12, block_size=4, preemption="swap", num_cpu_blocks=2, watermark=0.0)
    engine, seqs = run_poisoned(model, cfg)
    assert [s.output_token_ids for s in seqs] == uninterrupted
    recomputed = sum(r.num_prefill_tokens for r in engine.history) - sum(len(p) for p in make_requests())
    assert recomputed > 0, "with 2 CPU blocks some victims must be recomputed"


@pytest.mark.parametrize("policy", ["recompute", "swap"])
def test_recorded_gpu_cost_model_under_pressure(policy):
    runner, config = recorded_gpu_runner(block_size=16, swap_bytes_per_s=25e9)
    cfg = EngineConfig.preset(policy if policy == "swap" else "paged", num_blocks=40, block_size=16,
                              max_num_seqs=16)
    engine = LLMEngine(runner=runner, model_config=config, config=cfg, eos_token_ids=())
    seqs = [engine.add_request([1] * (40 + i), SamplingParams(max_tokens=120, ignore_eos=True), arrival_s=0.001 * i)
            for i in range(20)]
    engine.run(max_steps=20000)
    assert all(s.num_output_tokens == 120 for s in seqs)
    assert engine.stats()["num_preemptions"] > 0 and engine.block_manager.num_free_blocks == 40
    assert engine.now > 0 and all(s.ttft > 0 for s in seqs)


def test_simulated_swap_needs_a_bandwidth():
    cost = StepCostModel.from_roofline()
    runner = SimulatedRunner(cost, CONFIG.vocab_size, bytes_per_block=1 << 20)  # no swap_bytes_per_s
    cfg = EngineConfig(num_blocks=8, block_size=4, preemption="swap", num_cpu_blocks=16, watermark=0.0)
    engine = LLMEngine(runner=runner, model_config=CONFIG, config=cfg, eos_token_ids=())
    for i in range(4):
        engine.add_request([1] * 6, SamplingParams(max_tokens=10, ignore_eos=True))
    with pytest.raises(ValueError, match="swap_bytes_per_s"):
        engine.run(max_steps=500)
