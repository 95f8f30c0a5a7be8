"""Notebook 06's experiments on the engine, and their figures: what prefix sharing saves, and what it leaks.

    make_shared_prompt_trace   requests = one of a few long system prompts + a private user message
    serve_shared_prompts       that trace through LLMEngine (preset "prefix", or prefix caching off), timed
                               by the recorded GPU cost model (SimulatedRunner): hit rate, TTFT
    sampling_widget            parallel sampling: blocks held forked vs independent, sliders for the lengths
    roc_figure, attack_noise_figure
                               the timing attack of labkit.side_channel: ROC curves; AUC against timing noise
                               (simulated) with this machine's live repeats on top

The mechanisms are in ``labkit.prefix_cache`` (hash chain, PrefixCachingBlockManager) and the engine.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from labkit.prefix_cache import parallel_sampling_blocks

__all__ = ["SharedPromptTrace", "make_shared_prompt_trace", "serve_shared_prompts", "sampling_figure",
           "sampling_widget", "hit_rate_figure", "roc_figure", "attack_noise_figure", "cpu_prefix_run"]


@dataclasses.dataclass(frozen=True)
class SharedPromptTrace:
    """Requests that start with one of a few system prompts, then a private user message."""

    prompts: tuple[tuple[int, ...], ...]
    tenants: tuple[str, ...]
    system_ids: tuple[int, ...]  # which system prompt each request starts with
    output_lens: tuple[int, ...]
    arrival_s: tuple[float, ...]


def make_shared_prompt_trace(num_requests: int = 200, num_system_prompts: int = 4, system_len: int = 96,
                             user_len: tuple[int, int] = (8, 48), output_len: tuple[int, int] = (8, 32),
                             num_tenants: int = 4, vocab_size: int = 4096, rate: float = 20.0,
                             seed: int = 0) -> SharedPromptTrace:
    """A seeded trace: each request = one of ``num_system_prompts`` system prompts (Zipf-ish popularity)
    + a random user message of ``user_len`` tokens, Poisson arrivals at ``rate`` per second; tenants are
    assigned independently of the prompt, so several tenants use each system prompt (the cross-tenant
    sharing a per-tenant salt forfeits)."""
    rng = np.random.default_rng(seed)
    systems = [tuple(int(t) for t in rng.integers(0, vocab_size, system_len)) for _ in range(num_system_prompts)]
    popularity = 1.0 / np.arange(1, num_system_prompts + 1)
    popularity /= popularity.sum()
    sys_ids = rng.choice(num_system_prompts, size=num_requests, p=popularity)
    prompts, tenants, outs = [], [], []
    for i in range(num_requests):
        user = rng.integers(0, vocab_size, int(rng.integers(user_len[0], user_len[1] + 1)))
        prompts.append(systems[sys_ids[i]] + tuple(int(t) for t in user))
        tenants.append(f"tenant{int(rng.integers(num_tenants))}")
        outs.append(int(rng.integers(output_len[0], output_len[1] + 1)))
    arrivals = np.cumsum(rng.exponential(1.0 / rate, num_requests)) if rate > 0 else np.zeros(num_requests)
    return SharedPromptTrace(tuple(prompts), tuple(tenants), tuple(int(s) for s in sys_ids), tuple(outs),
                             tuple(float(a) for a in arrivals))


def serve_shared_prompts(trace: SharedPromptTrace, num_blocks: int, block_size: int = 16,
                         prefix_caching: bool = True, per_tenant_salt: bool = False, max_num_seqs: int = 8,
                         max_steps: int = 200_000) -> dict:
    """Serve the trace on ``LLMEngine`` with the recorded GPU cost model (``recorded_gpu_runner``: a
    Llama-3-8B shape on an H200). Returns the token hit rate, evictions, and TTFT (mean, per request)."""
    from labkit.engine import EngineConfig, LLMEngine, SamplingParams
    from labkit.engine.simulated_runner import recorded_gpu_runner

    runner, model_config = recorded_gpu_runner(block_size)
    preset = "prefix" if prefix_caching else "paged"
    cfg = EngineConfig.preset(preset, num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs)
    engine = LLMEngine(runner=runner, model_config=model_config, config=cfg, eos_token_ids=())
    seqs = [engine.add_request(list(p), SamplingParams(max_tokens=n, ignore_eos=True), arrival_s=t,
                               cache_salt=tenant if per_tenant_salt else None)
            for p, n, t, tenant in zip(trace.prompts, trace.output_lens, trace.arrival_s, trace.tenants)]
    engine.run(max_steps=max_steps)
    stats = engine.stats()
    queried = stats["prefix_cache_queries_tokens"]
    ttft = [s.ttft for s in seqs]
    return {"hit_rate": stats["prefix_cache_hits_tokens"] / queried if queried else 0.0,
            "evictions": engine.block_manager.bm.stats["evictions"], "num_requests": len(seqs),
            "num_preemptions": stats["num_preemptions"], "mean_ttft_s": float(np.mean(ttft)), "ttft_s": ttft,
            "prefill_tokens": sum(r.num_prefill_tokens for r in engine.history)}


def cpu_prefix_run(model, trace: SharedPromptTrace, num_blocks: int = 256, block_size: int = 16,
                   max_tokens: int = 2) -> dict:
    """Serve the trace's prompts one after another with the real ``model`` on this CPU (one thread), with and
    without prefix caching. Returns the prefill tokens each computed (exact), their wall-clock TTFTs (as noisy
    as this machine), and whether both produced the same tokens."""
    from labkit.engine import EngineConfig, LLMEngine, SamplingParams
    from labkit.side_channel import one_thread

    out = {}
    for cached in (False, True):
        cfg = EngineConfig.preset("prefix" if cached else "paged", num_blocks=num_blocks, block_size=block_size,
                                  max_num_seqs=1, enforce_eager=True)
        engine = LLMEngine(model, cfg, eos_token_ids=())
        with one_thread():
            seqs = []
            for p in trace.prompts:
                seqs.append(engine.add_request(list(p), SamplingParams(max_tokens=max_tokens)))
                engine.run(max_steps=10 * max_tokens)
        out[cached] = {"ttft_s": [s.ttft for s in seqs], "tokens": [s.output_token_ids for s in seqs],
                       "prefill_tokens": sum(r.num_prefill_tokens for r in engine.history),
                       "hit_rate": engine.stats()["prefix_cache_hits_tokens"] / max(1, engine.stats()["prefix_cache_queries_tokens"])}
    plain, cached = out[False], out[True]
    return {"same_tokens": plain["tokens"] == cached["tokens"], "hit_rate": cached["hit_rate"],
            "prefill_tokens": cached["prefill_tokens"], "prefill_tokens_no_cache": plain["prefill_tokens"],
            "median_ttft_s": float(np.median(cached["ttft_s"])),
            "median_ttft_no_cache_s": float(np.median(plain["ttft_s"]))}


# ---- figures ---------------------------------------------------------------------------------------
def sampling_figure(prompt_len: int = 161, output_len: int = 338, block_size: int = 16, max_n: int = 8):
    """Blocks held by n samples of one prompt: forked with copy-on-write vs n independent sequences."""
    import plotly.graph_objects as go

    rows = [parallel_sampling_blocks(prompt_len, [output_len] * n, block_size) for n in range(1, max_n + 1)]
    n = [r["n"] for r in rows]
    fig = go.Figure([go.Bar(x=n, y=[r["blocks_independent"] for r in rows], name="n independent copies"),
                     go.Bar(x=n, y=[r["blocks_shared"] for r in rows], name="forked, copy-on-write")])
    fig.update_layout(barmode="group", xaxis_title="samples per prompt (n)", yaxis_title="KV blocks held",
                      title=f"Parallel sampling, prompt {prompt_len}, answers {output_len}, block {block_size}: "
                            f"{rows[-1]['memory_saved']:.0%} saved at n={rows[-1]['n']} (exact block counts)",
                      height=380)
    return fig


def sampling_widget(prompt_len: int = 161, output_len: int = 338):
    """Sliders for the prompt and answer lengths (step 1, so 161 stays 161) over :func:`sampling_figure`."""
    import ipywidgets as widgets

    from labkit.live_figure import LiveFigure

    return LiveFigure(sampling_figure,
                      prompt_len=widgets.IntSlider(value=prompt_len, min=1, max=2048, step=1, description="prompt"),
                      output_len=widgets.IntSlider(value=output_len, min=1, max=2048, step=1, description="answers"))


def hit_rate_figure(results: dict, title: str):
    """results: {num_blocks: {"cached": serve_shared_prompts(...), "plain": serve_shared_prompts(..., False)}}."""
    import plotly.graph_objects as go

    xs = sorted(results)
    saved = [1 - results[x]["cached"]["mean_ttft_s"] / results[x]["plain"]["mean_ttft_s"] for x in xs]
    fig = go.Figure([go.Scatter(x=xs, y=[results[x]["cached"]["hit_rate"] for x in xs], name="token hit rate",
                                mode="lines+markers"),
                     go.Scatter(x=xs, y=saved, name="mean TTFT saved", mode="lines+markers")])
    fig.update_layout(xaxis_type="log", xaxis_title="KV pool (blocks of 16 tokens)", yaxis_tickformat=".0%",
                      title=title, height=380)
    return fig


def roc_figure(attack: dict, title: str):
    """attack: {salted (bool): run_attack(...) result}."""
    import plotly.graph_objects as go

    from labkit.side_channel import roc_curve

    fig = go.Figure()
    for salted, r in attack.items():
        fpr, tpr = roc_curve(r["scores"], r["labels"])
        name = "per-tenant salt" if salted else "shared cache"
        fig.add_trace(go.Scatter(x=fpr, y=tpr, name=f"{name} (AUC {r['auc']:.2f})"))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], name="chance", line=dict(dash="dot", color="gray")))
    fig.update_layout(xaxis_title="false positive rate", yaxis_title="true positive rate", height=420, title=title)
    return fig


def attack_noise_curve(cost, noise_levels_s, num_trials: int = 200, seed: int = 0) -> dict:
    """Simulated attack AUC (shared cache and salted) at each timing-noise std, on the calibrated cost model."""
    from labkit.side_channel import run_attack

    return {salted: [run_attack(num_trials, salted=salted, cost=cost, noise_s=float(s), seed=seed)["auc"]
                     for s in noise_levels_s] for salted in (False, True)}


def attack_noise_figure(noise_levels_s, curve: dict, signal_s: float, live: dict | None = None,
                        live_noise_s: float | None = None, title: str = ""):
    """AUC against noise std (simulated lines); ``signal_s`` (what the cached block saves) marked; ``live``
    (``repeat_attack`` on the CPU clock) as one dot per repeat at the noise measured with it."""
    import plotly.graph_objects as go

    ms = [1e3 * s for s in noise_levels_s]
    fig = go.Figure()
    colours = {False: "#e76f51", True: "#264653"}
    for salted in (False, True):
        name = "per-tenant salt" if salted else "shared cache"
        fig.add_trace(go.Scatter(x=ms, y=curve[salted], mode="lines+markers", name=f"{name}, simulated",
                                 line_color=colours[salted]))
        if live is not None and salted in live:
            aucs = live[salted]["auc"]
            fig.add_trace(go.Scatter(x=[1e3 * live_noise_s] * len(aucs), y=aucs, mode="markers",
                                     marker=dict(size=10, symbol="x", color=colours[salted]),
                                     name=f"{name}, live on this CPU ({len(aucs)} repeats)"))
    fig.add_vline(x=1e3 * signal_s, line_dash="dot", annotation_text="time one cached block saves")
    fig.update_layout(xaxis_type="log", xaxis_title="timing noise std (ms)", yaxis_title="ROC AUC",
                      yaxis_range=[0.3, 1.05], height=420, title=title)
    return fig
