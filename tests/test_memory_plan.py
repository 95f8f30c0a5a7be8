"""Memory planning: weights counted from the config, the CPU tracer against hand-made allocations, the profile
run, KV sizing against the engine's own store, refusals before anything is loaded, the OOM report, the widget."""
import pytest
import torch

import labkit  # noqa: F401
from labkit.bert import BertConfig, BertModel
from labkit.config import LlamaConfig
from labkit.engine import EngineConfig, LLMEngine
from labkit.engine.kv_store import PagedKVStore
from labkit.memory_plan import (MiB, LiveTensorBytes, PlanError, ProfileOOMError, estimate_encoder, estimate_llm,
                                num_kv_blocks, plan_memory, profile_llm, weight_bytes)
from labkit.model import LlamaForCausalLM

CONFIGS = [LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, attention_bias=ab,
                       qkv_bias=qb, mlp_bias=mb)
           for tie, ab, qb, mb in ((True, False, False, False), (False, True, False, True),
                                   (False, False, True, False))]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIGS[0]).eval()


@pytest.mark.parametrize("config", CONFIGS, ids=["tied", "llama-bias", "qwen2-bias"])
def test_weight_estimate_counts_every_parameter(config):
    model = LlamaForCausalLM(config)
    est = estimate_llm("m", config, EngineConfig(), torch.float32)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert est.weight_bytes == weight_bytes(model) - buffers == 4 * model.num_parameters


def test_encoder_weight_estimate_counts_every_parameter():
    c = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   max_position_embeddings=40)
    assert estimate_encoder("e", c, 2, 16).weight_bytes == 4 * BertModel(c).num_parameters


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_block_is_what_the_engine_store_allocates(dtype):
    c = CONFIGS[1]
    store = PagedKVStore(c, num_blocks=3, block_size=16, dtype=dtype)
    assert estimate_llm("m", c, EngineConfig(block_size=16), dtype).kv_bytes_per_block == store.bytes_per_block
    total = store.k_cache.numel() * store.k_cache.element_size() * 2
    assert store.bytes_per_block * 3 == total


def test_live_tensor_trace_follows_allocations_and_frees():
    with LiveTensorBytes() as t:
        a = torch.empty(MiB, dtype=torch.uint8)  # 1 MiB
        b = torch.ones(2 * MiB, dtype=torch.uint8)  # 3 MiB live
        view = b[:10]  # a view: no new memory
        b.add_(1)  # in place: none either
        del a  # 2 MiB live
        c = torch.zeros(3 * MiB, dtype=torch.uint8)  # 5 MiB live: the peak
        del b, view, c
        d = torch.zeros(MiB, dtype=torch.uint8)
    assert t.peak == 5 * MiB and t.live == MiB
    del d
    with pytest.raises(torch.OutOfMemoryError):
        with LiveTensorBytes(limit_bytes=MiB):
            torch.zeros(2 * MiB, dtype=torch.uint8)


@pytest.mark.timeout(60)
def test_profile_run_measures_the_largest_step(tiny):
    small = profile_llm("m", tiny, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64))
    big = profile_llm("m", tiny, EngineConfig(max_num_seqs=4, max_num_batched_tokens=256))
    assert small.weight_bytes == weight_bytes(tiny) and "trace" in small.method
    assert 0 < small.activation_bytes < big.activation_bytes
    for cfg, measured in ((EngineConfig(max_num_seqs=4, max_num_batched_tokens=64), small),
                          (EngineConfig(max_num_seqs=4, max_num_batched_tokens=256), big)):
        est = estimate_llm("m", tiny.config, cfg).activation_bytes
        assert 0.5 < est / measured.activation_bytes < 2.5, (est, measured.activation_bytes)


@pytest.mark.timeout(60)
def test_oom_in_the_profile_run_reports_a_budget_that_fits(tiny):
    cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=256)
    with pytest.raises(ProfileOOMError, match="out of memory during the profile run of 'llm'") as info:
        profile_llm("llm", tiny, cfg, limit_bytes=64 * 1024)
    need = info.value.min_budget_bytes
    fits = profile_llm("llm", tiny, cfg, limit_bytes=need - weight_bytes(tiny))  # the reported budget really fits
    assert fits.weight_bytes + fits.activation_bytes <= need


def _profiles():
    llm = estimate_llm("llm", CONFIGS[0], EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, block_size=16))
    guard = estimate_llm("guard", CONFIGS[1], EngineConfig(max_num_seqs=4, max_num_batched_tokens=128, block_size=16))
    emb = estimate_encoder("embedder", BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=64), 4, 32)
    return [llm, guard, emb]


def test_plan_sizes_pools_as_vllm_does():
    profiles = _profiles()
    budgets = {"llm": 8 * MiB, "guard": 4 * MiB, "embedder": 2 * MiB}
    plan = plan_memory(16 * MiB, budgets, profiles)
    for p in profiles:
        m = plan[p.name]
        if p.has_kv_cache:
            assert m.num_blocks == (budgets[p.name] - p.weight_bytes - p.activation_bytes) // p.kv_bytes_per_block
            assert 0 <= m.free_bytes < p.kv_bytes_per_block
            assert m.pool_seqs() == m.num_blocks // p.blocks_per_seq
            assert m.max_concurrent_seqs() == min(p.max_num_seqs, m.pool_seqs())
        else:
            assert m.num_blocks == 0 and m.max_concurrent_seqs() == p.max_num_seqs
    assert plan.unassigned_bytes == 2 * MiB
    assert "llm" in plan.table()


@pytest.mark.parametrize("budgets,device,message", [
    ({"llm": 8 * MiB, "guard": 8 * MiB, "embedder": 2 * MiB}, 16 * MiB, "add up to .* more than the device"),
    ({"llm": 32 * MiB, "guard": 4 * MiB, "embedder": 2 * MiB}, 16 * MiB, "'llm': its budget .* more than the whole"),
    ({"llm": 8 * MiB, "guard": 4 * MiB, "embedder": 64 * 1024}, 16 * MiB, "'embedder' does not fit its budget"),
    ({"llm": 8 * MiB, "guard": "one block short", "embedder": 2 * MiB}, 16 * MiB, "'guard': its KV pool would hold"),
    ({"llm": 8 * MiB, "guard": 4 * MiB}, 16 * MiB, "one budget per model"),
])
def test_impossible_plans_are_refused_naming_the_model(budgets, device, message):
    profiles = _profiles()
    if budgets.get("guard") == "one block short":  # a pool one block short of one full-length sequence
        g = profiles[1]
        budgets = {**budgets, "guard": g.min_budget_bytes - g.kv_bytes_per_block}
    with pytest.raises(PlanError, match=message):
        plan_memory(device, budgets, profiles)


def test_num_kv_blocks_never_negative():
    p = _profiles()[0]
    assert num_kv_blocks(p.weight_bytes, p) == 0


@pytest.mark.timeout(60)
def test_a_planned_pool_serves_its_concurrent_sequences(tiny):
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, block_size=16)
    prof = profile_llm("llm", tiny, cfg)
    budget = prof.weight_bytes + prof.activation_bytes + 3 * prof.blocks_per_seq * prof.kv_bytes_per_block + 100
    m = plan_memory(budget, {"llm": budget}, [prof])["llm"]
    assert m.num_blocks == 3 * prof.blocks_per_seq and m.max_concurrent_seqs() == 3
    engine = LLMEngine(tiny, EngineConfig(num_blocks=m.num_blocks, max_num_seqs=8, block_size=16, watermark=0.0))
    assert engine.runner.store.bytes_per_block * m.num_blocks == m.kv_bytes


def test_explorer_controls_change_the_figure():
    from labkit.memory_plan_figures import PlanExplorer

    profiles = _profiles()
    ex = PlanExplorer({"small device": ("test", 16 * MiB, profiles), "big device": ("test", 64 * MiB, profiles)},
                      {"small device": {"llm": 8 * MiB, "guard": 4 * MiB, "embedder": 2 * MiB}})
    first = ex.last_figure.to_json()
    ex.sliders["llm"].value = 6.0
    second = ex.last_figure.to_json()
    assert second != first
    ex.tokens.value = 64
    assert ex.last_figure.to_json() != second
    ex.sliders["guard"].value = 14.0  # over the device with the others: refused, said in the message
    assert ex.last_figure is None and "refused" in ex.message.value
    ex.device.value = "big device"
    assert ex.last_figure is not None and "big device" in ex.last_figure.layout.title.text
