"""The engine against generate(): every request, whatever the schedule, gets the tokens it gets alone.

Randomised over pool sizes, block sizes, chunk budgets, shared prefixes, salts, batching and
preemption policies, arrivals and aborts; then the edge cases by name. The pool must be whole again
at the end (no leaked or double-freed block) and every run ends within a bounded number of steps.
"""
from __future__ import annotations

import random

import pytest
import torch

import labkit  # noqa: F401
from labkit.config import LlamaConfig
from labkit.engine import EngineConfig, LLMEngine, SamplingParams, SequenceStatus
from labkit.engine.model_runner import ModelRunner
from labkit.generate import generate
from labkit.kv_cache import ContiguousCache
from labkit.model import LlamaForCausalLM

pytestmark = pytest.mark.timeout(240)


class FixedClockRunner(ModelRunner):
    """One second per step, so the schedule (and so each batch's numerics) does not depend on this machine."""

    def execute(self, out):
        tokens = super().execute(out)
        self.last_step_seconds = 1.0
        return tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).eval()
    for p in m.parameters():  # a wider spread of logits than the default init: no near-ties in argmax
        p.data.normal_(0, 0.3)
    return m


def reference(model, prompt, params: SamplingParams) -> list[int]:
    cache = ContiguousCache(model.config, 1, len(prompt) + params.max_tokens)
    toks = generate(model, prompt, params.max_tokens, cache=cache).token_ids
    for i, t in enumerate(toks):
        if t in params.stop_token_ids:
            return toks[:i + 1]
    return toks


def make_engine(model, cfg: EngineConfig) -> LLMEngine:
    return LLMEngine(model, cfg, runner=FixedClockRunner(model, cfg, model.config.max_position_embeddings),
                     eos_token_ids=())


def assert_pool_whole(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} blocks leaked"
    assert all(r == 0 for r in bm.ref_count)
    assert bm.cpu.num_free_blocks == bm.cpu.num_blocks and not bm.cpu_tables


def random_config(rng: random.Random, longest: int) -> EngineConfig:
    block_size = rng.choice([1, 2, 4, 8, 16])
    need = -(-longest // block_size)
    allocation = rng.choice(["paged", "paged", "contiguous"])
    kwargs = dict(block_size=block_size, allocation=allocation, batching=rng.choice(["continuous", "continuous",
                                                                                      "static", "one-at-a-time"]),
                  max_num_seqs=rng.choice([1, 2, 4, 8]), watermark=rng.choice([0.0, 0.01, 0.2]))
    if allocation == "contiguous":
        kwargs.update(preemption="none", num_blocks=need + rng.randrange(0, 3 * need))
        kwargs.update(enable_chunked_prefill=rng.random() < 0.5)
    else:
        policy = rng.choice(["recompute", "swap"])
        kwargs.update(preemption=policy, num_blocks=need + rng.randrange(0, 2 * need),
                      enable_prefix_caching=rng.random() < 0.6, enable_chunked_prefill=rng.random() < 0.7)
        if policy == "swap":
            kwargs["num_cpu_blocks"] = rng.randrange(1, 3 * need)
    chunked = kwargs["enable_chunked_prefill"]
    kwargs["max_num_batched_tokens"] = rng.choice([3, 8, 32, 64]) if chunked else longest + rng.randrange(0, 32)
    return EngineConfig(**kwargs)


@pytest.mark.parametrize("seed", range(12))
def test_randomised_engine_matches_generate(model, seed):
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    prefixes = [[rng.randrange(vocab) for _ in range(rng.randrange(4, 40))] for _ in range(3)]
    requests = []
    for i in range(rng.randrange(4, 10)):
        head = rng.choice(prefixes) if rng.random() < 0.6 else []
        prompt = head + [rng.randrange(vocab) for _ in range(rng.randrange(1, 24))]
        stops = (rng.randrange(vocab),) if rng.random() < 0.3 else ()
        params = SamplingParams(max_tokens=rng.randrange(1, 20), stop_token_ids=stops)
        salt = rng.choice([None, None, "tenant-a", "tenant-b"])
        requests.append((prompt, params, salt, rng.randrange(0, 12)))
    longest = max(len(p) + sp.max_tokens for p, sp, _, _ in requests)
    cfg = random_config(rng, longest)
    engine = make_engine(model, cfg)
    seqs = [engine.add_request(p, sp, arrival_s=float(t), cache_salt=salt) for p, sp, salt, t in requests]
    aborted = set(rng.sample(range(len(seqs)), k=rng.randrange(0, 2)))
    abort_at = {i: rng.randrange(0, 30) for i in aborted}
    steps = 0
    while engine.has_unfinished():
        for i, when in abort_at.items():
            if when == steps:
                engine.abort(seqs[i].seq_id)
        engine.step()
        steps += 1
        assert steps < 5000, "the engine livelocked"
    for i, (seq, (prompt, params, _, _)) in enumerate(zip(seqs, requests)):
        assert seq.status is SequenceStatus.FINISHED
        if i in aborted and seq.finish_reason.value == "abort":
            ref = reference(model, prompt, params)
            assert seq.output_token_ids == ref[:len(seq.output_token_ids)]
            continue
        assert seq.output_token_ids == reference(model, prompt, params), (cfg, i)
    assert_pool_whole(engine)


def run_all(engine, requests, max_steps=3000):
    seqs = [engine.add_request(p, sp) for p, sp in requests]
    engine.run(max_steps=max_steps)
    return seqs


def test_prompt_entirely_in_prefix_cache_still_computes_its_last_token(model):
    engine = make_engine(model, EngineConfig(num_blocks=32, block_size=4, enable_prefix_caching=True))
    prompt = list(range(1, 17))  # exactly four full blocks
    params = SamplingParams(max_tokens=5)
    first, second = run_all(engine, [(prompt, params)]) + run_all(engine, [(prompt, params)])
    assert second.num_cached_tokens == 12  # three blocks hit; the fourth holds the last token, which is computed
    assert first.output_token_ids == second.output_token_ids == reference(model, prompt, params)
    assert_pool_whole(engine)


def test_preemption_then_prefix_cache_hit(model):
    cfg = EngineConfig(num_blocks=12, block_size=4, enable_prefix_caching=True, preemption="recompute",
                       max_num_batched_tokens=64, watermark=0.0)
    engine = make_engine(model, cfg)
    prompts = [[7] * 12 + [i] for i in range(4)]
    reqs = [(p, SamplingParams(max_tokens=20)) for p in prompts]
    seqs = run_all(engine, reqs)
    preempted = [s for s in seqs if s.num_preemptions]
    assert preempted, "the pool was meant to be too small for all four at once"
    assert any(s.num_cached_tokens > 0 for s in preempted), "readmission should hit its own cached blocks"
    for s, (p, sp) in zip(seqs, reqs):
        assert s.output_token_ids == reference(model, p, sp)
    assert_pool_whole(engine)


@pytest.mark.parametrize("allocation", ["paged", "contiguous"])
def test_request_that_needs_the_whole_pool_with_a_watermark(model, allocation):
    prompt, params = list(range(10)), SamplingParams(max_tokens=22)  # 32 tokens = 8 blocks of 4
    cfg = EngineConfig(num_blocks=8, block_size=4, watermark=0.5, allocation=allocation,
                       preemption="none" if allocation == "contiguous" else "recompute")
    engine = make_engine(model, cfg)
    (seq,) = run_all(engine, [(prompt, params)], max_steps=100)
    assert seq.output_token_ids == reference(model, prompt, params)
    assert_pool_whole(engine)


def test_abort_of_a_swapped_request_frees_its_swap_space(model):
    cfg = EngineConfig(num_blocks=10, block_size=4, preemption="swap", num_cpu_blocks=40, watermark=0.0)
    engine = make_engine(model, cfg)
    seqs = [engine.add_request([i + 1] * 9, SamplingParams(max_tokens=25)) for i in range(3)]
    for _ in range(200):
        engine.step()
        if engine.scheduler.swapped:
            break
    victim = engine.scheduler.swapped[0]
    assert engine.block_manager.cpu_tables[victim.seq_id]
    engine.abort(victim.seq_id)
    engine.run(max_steps=500)
    assert victim.finish_reason.value == "abort"
    for s in seqs:
        if s is not victim:
            assert s.output_token_ids == reference(model, [s.prompt_token_ids[0]] * 9, SamplingParams(max_tokens=25))
    assert_pool_whole(engine)


def snapshot(engine):
    bm = engine.block_manager
    return (len(engine.requests), len(engine.scheduler.waiting), bm.num_free_blocks, list(bm.ref_count))


@pytest.mark.parametrize("bad, message", [
    (dict(prompt=[5, 101]), "prompt token 101"),
    (dict(prompt=[5, 2.5]), "prompt token 2.5"),
    (dict(prompt=[]), "empty"),
    (dict(prompt=list(range(100)) * 3), "max_model_len"),
    (dict(prompt=[1, 2], params=SamplingParams(max_tokens=200)), "could never finish"),
    (dict(prompt=[1, 2], params=SamplingParams(max_tokens=2, stop_token_ids=[500])), "outside the vocabulary"),
    (dict(prompt=[1, 2], params={"max_tokens": 3}), "SamplingParams"),
    (dict(prompt="hello"), "token ids"),
])
def test_bad_requests_are_refused_and_change_nothing(model, bad, message):
    engine = make_engine(model, EngineConfig(num_blocks=16, block_size=4))
    engine.add_request([3, 4, 5], SamplingParams(max_tokens=4))
    engine.step()
    before = snapshot(engine)
    with pytest.raises(ValueError, match=message):
        engine.add_request(bad["prompt"], bad.get("params", SamplingParams(max_tokens=4)))
    assert snapshot(engine) == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
    (dict(max_tokens=0), "max_tokens"), (dict(seed=1.5), "seed"), (dict(temperature=float("nan")), "temperature"),
])
def test_sampling_params_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=1234)
    alone = run_all(make_engine(model, EngineConfig(num_blocks=64, block_size=4)), [([1, 2, 3], params)])[0]
    others = [([i, i + 1], SamplingParams(max_tokens=9, temperature=1.0, seed=i)) for i in range(5)]
    batched = run_all(make_engine(model, EngineConfig(num_blocks=64, block_size=4)), others + [([1, 2, 3], params)])
    assert batched[-1].output_token_ids == alone.output_token_ids


def test_engine_config_is_validated():
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=3)
    with pytest.raises(ValueError, match="num_cpu_blocks"):
        EngineConfig(preemption="swap")
    with pytest.raises(ValueError, match="batching"):
        EngineConfig(batching="dynamic")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_on_gpu_kernels_and_cuda_graphs(dtype):
    """The Triton path (prefill + decode kernels, CUDA graphs) gives generate()'s tokens; graphs == eager exactly."""
    from labkit.checkpoint import load_default_model

    model, _ = load_default_model(dtype=dtype, device="cuda")
    rng = random.Random(0)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(rng.randrange(3, 200))] for _ in range(12)]
    prompts += [prompts[0][:40] + [5, 6, 7]]  # a prefix-cache hit
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        cfg = EngineConfig(num_blocks=400, block_size=16, max_num_batched_tokens=256, enforce_eager=eager,
                           enable_prefix_caching=True)
        engine = LLMEngine(model, cfg, eos_token_ids=())
        assert engine.runner.store.use_kernels
        seqs = [engine.add_request(p, params) for p in prompts]
        engine.run(max_steps=2000)
        outs[eager] = [s.output_token_ids for s in seqs]
        assert_pool_whole(engine)
    assert outs[True] == outs[False], "CUDA-graph replay must give exactly the eager tokens"
    agree = total = 0
    for p, got in zip(prompts, outs[True]):
        ref = generate(model, p, 24).token_ids
        assert got[0] == ref[0]
        agree += sum(a == b for a, b in zip(got, ref))
        total += len(ref)
    assert agree / total >= (0.99 if dtype == torch.float32 else 0.8), f"{agree}/{total} tokens agree with generate()"


@pytest.mark.timeout(400)
def test_engine_through_the_triton_kernels_in_the_interpreter():
    """The kernel path of the runner (cache write, prefill and decode attention) on a tiny model, on the CPU."""
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    tiny = LlamaForCausalLM(cfg).eval()
    for p in tiny.parameters():
        p.data.normal_(0, 0.5)
    engine_cfg = EngineConfig(num_blocks=16, block_size=4, max_num_batched_tokens=6, attention_backend="triton",
                              enable_prefix_caching=True)
    engine = make_engine(tiny, engine_cfg)
    assert engine.runner.store.use_kernels
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 10], [11, 12]]
    params = SamplingParams(max_tokens=4)
    seqs = run_all(engine, [(p, params) for p in prompts])
    assert seqs[1].num_cached_tokens == 8
    for s, p in zip(seqs, prompts):
        assert s.output_token_ids == reference(tiny, p, params)
    assert_pool_whole(engine)
def test_step_returns_every_sequence_that_sampled_including_its_prefill(model):
    """A server streams what step() returns: the prefill's token (the first token) must be in it."""
    engine = make_engine(model, EngineConfig(num_blocks=64, block_size=4))
    seq = engine.add_request([3, 1, 4, 1, 5], SamplingParams(max_tokens=3))
    got = []
    while engine.has_unfinished():
        got += [s.token_ids[-1] for s in engine.step() if s is seq]
    assert got == seq.output_token_ids and len(got) == 3


@pytest.mark.timeout(300)
def test_llm_chat_renders_the_models_template_and_matches_generate():
    """SmolLM2-135M-Instruct (fetched by `make models`): LLM.chat == generate() on the rendered template."""
    from labkit.checkpoint import SMOLLM2_GGUF, load_pretrained
    from labkit.engine import LLM

    if not SMOLLM2_GGUF.exists():
        pytest.skip(f"{SMOLLM2_GGUF} is missing: run `make models`")
    model, tok = load_pretrained(SMOLLM2_GGUF)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    llm = LLM(model, tok, num_blocks=64, block_size=16)
    out = llm.chat(messages, SamplingParams(max_tokens=12))
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    eos = model.config.eos_token_id
    eos = eos if isinstance(eos, int) else eos[0]
    ref = generate(model, ids, 12, eos_token_id=eos).token_ids
    assert out.prompt_token_ids == list(ids) and out.token_ids == ref
    assert "Paris" in out.text
    from labkit.checkpoint import load_default_model

    with pytest.raises(ValueError, match="no chat template"):
        LLM(*load_default_model()).chat(messages)
