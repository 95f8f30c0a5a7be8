"""Notebook 11 exercise: the engine's step loop, checked by serving real requests with it."""
import functools

import torch

from labkit.exercises import Exercise


@functools.lru_cache(maxsize=1)
def _tiny_model():
    from labkit.config import LlamaConfig
    from labkit.model import LlamaForCausalLM

    torch.manual_seed(11)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128))
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    return model.eval()


def _engine_step(scheduler, runner, now):
    """One step: the scheduler picks, the runner runs, the scheduler takes the tokens back."""
    out = scheduler.schedule()
    tokens = runner.execute(out)
    return scheduler.postprocess(out, tokens, now)


def _scenario(gen):
    """A seed; the harness builds a small engine (a pool tight enough to preempt) and requests from it."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=gen)),


def _serve_with(step_fn, seed: int):
    """Serve the scenario's requests with ``step_fn`` as the engine's step; return each request's tokens and
    what is left in the pool (it must be whole again)."""
    from labkit.engine import EngineConfig, LLMEngine, SamplingParams

    gen = torch.Generator().manual_seed(seed)
    model = _tiny_model()
    policy = ["recompute", "swap"][int(torch.randint(0, 2, (1,), generator=gen))]
    cfg = EngineConfig(num_blocks=int(torch.randint(6, 14, (1,), generator=gen)), block_size=4, preemption=policy,
                       num_cpu_blocks=32 if policy == "swap" else 0, max_num_batched_tokens=8, watermark=0.0)
    engine = LLMEngine(model, cfg, eos_token_ids=())
    for _ in range(int(torch.randint(2, 6, (1,), generator=gen))):
        prompt = torch.randint(0, 61, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
        engine.add_request(prompt, SamplingParams(max_tokens=int(torch.randint(1, 10, (1,), generator=gen))))
    for step in range(500):
        if not engine.scheduler.has_work():
            break
        step_fn(engine.scheduler, engine.runner, float(step))
    else:
        raise AssertionError("your step function did not finish the requests in 500 steps "
                             "(does it call scheduler.postprocess with the runner's tokens?)")
    tokens = {s.seq_id: s.output_token_ids for s in engine.requests.values()}
    return {"tokens": tokens, "free_blocks": engine.block_manager.num_free_blocks, "pool": cfg.num_blocks}


EXERCISES = {
    "engine_step": Exercise(
        reference=_engine_step, make_inputs=_scenario, harness=_serve_with, trials=4,
        spec="engine_step(scheduler, runner, now): schedule the step, execute it, post-process the sampled tokens; "
             "return the sequences that finished. Checked by serving random requests with it."),
}
