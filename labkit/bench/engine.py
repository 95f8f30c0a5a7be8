"""The whole engine on a GPU: a sharegpt-like trace against transformers, and one decode step against the floor.

Model: a Llama with Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 query / 8 KV heads, head_dim 64,
vocab 128256, tied embeddings), bf16, random weights (std 0.02): the speed of a forward does not depend
on what the weights say. Every request arrives at t = 0 (offline throughput) and produces exactly its
trace output length (``ignore_eos`` / ``min_new_tokens``), so every implementation does the same work.

    labkit_engine            LLMEngine, paged KV, continuous batching, chunked prefill, CUDA-graph decode
    labkit_engine_eager      the same with enforce_eager=True (every kernel launched from Python)
    hf_generate_sequential   transformers ``generate`` one request at a time (a subset of the trace)
    hf_generate_batched      transformers ``generate`` on padded batches (a subset of the trace)

TTFT / TPOT follow vLLM: TTFT = first token - arrival; TPOT = (last - first) / (n - 1).
Decode steps: B sequences with ``--context`` cached tokens each; the floor is (weight bytes + K/V bytes
read) / copy bandwidth measured in the same run. Kernels per step are counted with torch.profiler.

``--fused``: the decode steps are timed again after ``labkit.fused_ops.fuse_model`` (rows with ``fused: true``),
kernels per step counted the same way. ``--decode-only``: only the decode steps (no trace, no transformers):
``python -m labkit.bench engine --decode-only --batches 1,8 --fused --out /tmp/fused.json`` (about a minute).

GPU: ``python -m labkit.bench engine``. CPU smoke run: ``python -m labkit.bench engine --quick --out /tmp/e.json``.
"""
from __future__ import annotations

import re
import time

import numpy as np
import torch

from labkit.config import LlamaConfig
from labkit.engine import EngineConfig, LLMEngine, SamplingParams
from labkit.fused_ops import fuse_model, is_fused
from labkit.model import LlamaForCausalLM
from labkit.traces import make_trace

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True)


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model and trace (a CPU smoke run)")
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--max-prompt", type=int, default=1024, help="prompt lengths are clipped to this")
    parser.add_argument("--max-output", type=int, default=512, help="output lengths are clipped to this")
    parser.add_argument("--hf-sequential", type=int, default=4, help="requests transformers runs one at a time")
    parser.add_argument("--hf-batched", type=int, default=64, help="requests transformers runs in padded batches")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--context", type=int, default=1024, help="cached tokens per sequence in the decode steps")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed per batch size")
    parser.add_argument("--fused", action="store_true",
                        help="also time the decode steps with labkit.fused_ops (fused kernels, qkv / gate_up GEMVs)")
    parser.add_argument("--decode-only", action="store_true", help="only the decode steps: no trace, no transformers")


def make_model(quick: bool, device, dtype, shape: dict | None = None):
    """The benchmark's Llama (``shape``, else TINY or LLAMA_1B), random weights, seeded: every call gives the same."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**(shape or (TINY if quick else LLAMA_1B)))
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model.to(dtype).eval()


def workload(args, vocab: int):
    trace = make_trace("sharegpt", args.num_requests, rate=float("inf"), seed=0, max_len=4096)
    rng = np.random.default_rng(0)
    out = []
    for r in trace.requests:
        p, n = min(r.prompt_len, args.max_prompt), min(r.output_len, args.max_output)
        out.append((rng.integers(0, vocab, p).tolist(), n))
    return out


def latency_stats(ttft: list[float], tpot: list[float]) -> dict:
    return {"ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "tpot_p50_s": float(np.percentile(tpot, 50)) if tpot else 0.0,
            "tpot_p99_s": float(np.percentile(tpot, 99)) if tpot else 0.0}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def kv_blocks_for(model, device, share: float, block_size: int, fallback: int) -> int:
    if device.type != "cuda":
        return fallback
    c = model.config
    per_block = 2 * c.num_hidden_layers * block_size * c.num_key_value_heads * c.head_dim * 2
    free, _ = torch.cuda.mem_get_info()
    return int(free * share) // per_block


def run_engine(model, requests, eager: bool, num_blocks: int, device) -> dict:
    cfg = EngineConfig(num_blocks=num_blocks, block_size=16, max_num_seqs=256, max_num_batched_tokens=8192,
                       enforce_eager=eager, watermark=0.01)
    engine = LLMEngine(model, cfg, clock="wall", eos_token_ids=())
    engine.runner.capture_all(cfg.max_num_seqs)  # capture before the clock starts, as a server does at startup
    engine.reset_clock()
    seqs = [engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True), arrival_s=0.0) for p, n in requests]
    start = time.perf_counter()
    engine.run()
    sync(device)
    wall = time.perf_counter() - start
    tokens = sum(s.num_output_tokens for s in seqs)
    row = {"impl": "labkit_engine_eager" if eager else "labkit_engine", "requests": len(seqs),
           "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall, "steps": len(engine.history),
           "preemptions": engine.stats()["num_preemptions"], "num_blocks": num_blocks,
           **latency_stats([s.ttft for s in seqs], [s.tpot for s in seqs if s.num_output_tokens > 1])}
    del engine
    free_gpu_memory()
    return row


def free_gpu_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_model(model, device):
    import transformers

    c = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings, rms_norm_eps=c.rms_norm_eps,
        pad_token_id=0)
    hf = transformers.LlamaForCausalLM(hf_cfg).to(device=device, dtype=next(model.parameters()).dtype)
    hf.load_state_dict(model.state_dict())
    return hf.eval()


class _StepClock:
    """A logits processor that only notes when each generation step's logits were ready."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_hf(hf, requests, batch_size: int, device, t0: float) -> tuple[list[float], list[float], int]:
    """Generate ``requests`` in order, ``batch_size`` at a time, left-padded; per-request TTFT/TPOT from t0."""
    from transformers import LogitsProcessorList

    ttft, tpot, tokens = [], [], 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, (p, _) in enumerate(batch):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        n_max = max(n for _, n in batch)
        clock = _StepClock()
        with torch.no_grad():
            hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n_max,
                        min_new_tokens=n_max, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                        pad_token_id=0)
        sync(device)
        times = clock.times
        for _, n in batch:  # a request's own tokens are the first n of the batch's steps
            ttft.append(times[0] - t0)
            if n > 1:
                tpot.append((times[n - 1] - times[0]) / (n - 1))
            tokens += n
    return ttft, tpot, tokens


def hf_rows(model, requests, args, device) -> list[dict]:
    hf = hf_model(model, device)
    rows = []
    for impl, n, bs in (("hf_generate_sequential", args.hf_sequential, 1),
                        ("hf_generate_batched", args.hf_batched, args.hf_batch_size)):
        subset = requests[:n]
        run_hf(hf, subset[:1], 1, device, time.perf_counter())  # warm up
        t0 = time.perf_counter()
        ttft, tpot, tokens = run_hf(hf, subset, bs, device, t0)
        wall = time.perf_counter() - t0
        rows.append({"impl": impl, "requests": len(subset), "batch_size": bs, "output_tokens": tokens, "wall_s": wall,
                     "output_tok_s": tokens / wall, **latency_stats(ttft, tpot)})
    del hf
    free_gpu_memory()
    return rows


KERNEL_KINDS = (  # (kind, regex on the kernel's name), first match wins: where a step's GPU time goes
    ("linear", r"gemv|gemm|_int8_|_int4_|ternary|cutlass|sm90_xmma|nvjet|splitK|matmul"),
    ("attention", r"attention|flash|paged|sdpa|fmha"),
    ("norm / rope / act", r"rms|norm|rope|rotary|silu|act_and_mul|fused_add"),
    ("kv cache write", r"cache_write|reshape_and_cache"),
)


def kernel_kind(name: str) -> str:
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def count_kernels(fn) -> tuple[int, int, dict]:
    """(GPU kernels run, host-side launch calls, GPU time) of one call of ``fn`` under torch.profiler.

    GPU time: ``busy_ms`` the kernels' summed durations, ``span_ms`` first kernel start to last kernel end (the
    gaps between is what the GPU waited for: launches, the host; the profiler slows the launches, so this span is
    longer than an unprofiled step), ``by_kind`` busy ms per KERNEL_KINDS."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    gpu = [e for e in prof.events() if e.device_type.name == "CUDA"]
    launches = sum(1 for e in prof.events() if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                          "cuLaunchKernelEx", "cudaGraphLaunch"))
    by_kind: dict[str, float] = {}
    for e in gpu:
        kind = kernel_kind(e.name)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.time_range.elapsed_us() / 1e3
    span = (max(e.time_range.end for e in gpu) - min(e.time_range.start for e in gpu)) / 1e3 if gpu else 0.0
    timing = {"busy_ms": sum(by_kind.values()), "span_ms": span, "by_kind": by_kind}
    return len(gpu), launches, timing


def decode_rows(model, args, device, copy_gbps: float | None, weight_bytes: int | None = None,
                graph_modes=(True, False)) -> list[dict]:
    """Time decode steps at each of ``args.batches``; ``weight_bytes``: what one step reads of the weights (default:
    every parameter once; a quantised model keeps its codes in buffers, so its caller counts them)."""
    c = model.config
    if weight_bytes is None:
        weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    kv_per_token = (2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
                    * next(model.parameters()).element_size())
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for graphs in graph_modes:
            blocks = batch * -(-(args.context + args.steps + batch * args.context // 8192 + 32) // 16) + 16
            cfg = EngineConfig(num_blocks=blocks, block_size=16, max_num_seqs=max(batch, 1),
                               max_num_batched_tokens=max(8192, args.context), enforce_eager=not graphs)
            engine = LLMEngine(model, cfg, eos_token_ids=())
            gen = torch.Generator().manual_seed(batch)
            # long enough that nobody finishes while timed: the batch (and so the graph bucket) stays the same
            budget = args.steps + batch * args.context // cfg.max_num_batched_tokens + 16
            for _ in range(batch):
                prompt = torch.randint(0, c.vocab_size, (args.context,), generator=gen).tolist()
                engine.add_request(prompt, SamplingParams(max_tokens=budget, ignore_eos=True))
            engine.runner.capture_all(batch)  # captured before timing, as a server does at startup
            while any(s.num_output_tokens == 0 for s in engine.requests.values()):
                engine.step()  # prefill everyone
            engine.step()
            sync(device)
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                engine.step()
                sync(device)
                times.append(time.perf_counter() - t)
            kernels, launches, gpu_time = count_kernels(engine.step) if device.type == "cuda" else (None, None, None)
            step_ms = float(np.median(times)) * 1e3
            kv_bytes = batch * (args.context + args.steps // 2) * kv_per_token
            floor = (weight_bytes + kv_bytes) / (copy_gbps * 1e9) * 1e3 if copy_gbps else None
            rows.append({"batch": batch, "cuda_graphs": graphs and device.type == "cuda",
                         "fused": is_fused(model), "step_ms": step_ms,
                         "step_ms_p10": float(np.percentile(times, 10)) * 1e3,
                         "step_ms_p90": float(np.percentile(times, 90)) * 1e3,
                         "floor_ms": floor, "weight_bytes": weight_bytes, "kv_bytes_read": kv_bytes,
                         "kernels_per_step": kernels, "launches_per_step": launches, "gpu_time": gpu_time,
                         "ratio_to_floor": step_ms / floor if floor else None})
            print(rows[-1], flush=True)
            del engine
            free_gpu_memory()
            if device.type != "cuda":
                break
    return rows


def run(args) -> dict:
    from labkit.bench import record

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.num_requests, args.max_prompt, args.max_output = min(args.num_requests, 12), 48, 16
        args.hf_sequential, args.hf_batched, args.hf_batch_size = 2, 4, 2
        args.batches, args.context, args.steps = "1,4", 32, 3
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = make_model(args.quick, device, dtype)
    copy_gbps = record.copy_bandwidth_gbps() if device.type == "cuda" else None
    if args.decode_only:
        return {"shapes": shapes(model, args, dtype), "copy_gbps": copy_gbps, "decode_steps": all_decode_rows(
            model, args, device, copy_gbps)}
    requests = workload(args, model.config.vocab_size)
    rows = []
    for eager in (False, True):
        blocks = kv_blocks_for(model, device, 0.5, 16, fallback=4096)
        rows.append(run_engine(model, requests, eager, blocks, device))
        print(rows[-1], flush=True)
    rows += hf_rows(model, requests, args, device)
    for r in rows[-2:]:
        print(r, flush=True)
    steps = all_decode_rows(model, args, device, copy_gbps)
    engine_tok_s = rows[0]["output_tok_s"]
    hf_batched = next(r for r in rows if r["impl"] == "hf_generate_batched")["output_tok_s"]
    return {"shapes": shapes(model, args, dtype), "copy_gbps": copy_gbps, "rows": rows, "decode_steps": steps,
            "checks": {"engine_vs_hf_batched": engine_tok_s / hf_batched}}


def all_decode_rows(model, args, device, copy_gbps) -> list[dict]:
    """The decode steps of ``model``; with ``--fused`` then again after fusing it (in place), each with its own
    weight bytes (the same matrices, concatenated: the floor does not move)."""
    rows = decode_rows(model, args, device, copy_gbps)
    if args.fused:
        rows += decode_rows(fuse_model(model), args, device, copy_gbps)
        for r in rows:
            print({k: r[k] for k in ("batch", "cuda_graphs", "fused", "step_ms", "kernels_per_step", "floor_ms")},
                  flush=True)
    return rows


def shapes(model, args, dtype) -> dict:
    c = model.config
    out = {"model": "Llama-3.2-1B shape, random weights" if not args.quick else "tiny", "dtype": str(dtype),
           "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
           "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
           "head_dim": c.head_dim, "vocab_size": c.vocab_size, "decode_context": args.context}
    if not args.decode_only:
        out.update(trace="sharegpt (labkit.traces), all at t=0", num_requests=args.num_requests,
                   max_prompt=args.max_prompt, max_output=args.max_output)
    return out
