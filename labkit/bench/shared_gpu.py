"""One GPU, three models: memory per model, KV capacity against budget, the pipeline with 1/2/3 models, contention.

    load      the LLM (data/model), the guard (SmolLM2-135M-Instruct GGUF) and the embedder (all-MiniLM-L6-v2)
    profile   each model's weights and peak activations at its largest step (torch.cuda.max_memory_allocated),
              next to the estimate from config.json
    capacity  the LLM's KV blocks and full-length sequences for budgets from its minimum to most of the device,
              and as the other two models' budgets grow
    plan      a budget each (--budgets, fractions of the device), engines built with the pools the plan gives
    pipeline  guard -> embed -> retrieve -> generate under Poisson load, with 1, 2 and 3 models, each run bounded:
              throughput, p50/p99 latency and per-stage time
    contention the LLM's engine (decoding) and the guard's engine (classifying) on one device: alone, time-sliced
              in one thread, and concurrent in two threads with a CUDA stream each

Run on a GPU machine: ``python -m labkit.bench shared_gpu`` -> data/bench/shared_gpu.json. ``--tiny`` runs small
shapes (a CPU check; ``--out`` keeps it away from the recorded file). The model files are git-ignored:
``make embedder`` (models/all-MiniLM-L6-v2) and ``make models`` (models/SmolLM2-135M-Instruct.Q4_1.gguf).
"""
from __future__ import annotations

import dataclasses
import time

import torch

import labkit
from labkit.bert import DEFAULT_EMBEDDER_DIR, load_embedder
from labkit.checkpoint import DEFAULT_MODEL_DIR, load_pretrained
from labkit.contention import make_workload, run_contention
from labkit.engine import EngineConfig, LLMEngine, SamplingParams
from labkit.guard import GUARD_MODEL_PATH, Guard
from labkit.memory_plan import (device_memory_bytes, estimate_encoder, estimate_llm, plan_memory, profile_encoder,
                                profile_llm)
from labkit.memory_plan import pool_as_others_grow
from labkit.pipeline import RAGPipeline, load_questions, poisson_arrivals
from labkit.retrieval import PassageIndex, austen_passages


def add_arguments(parser) -> None:
    parser.add_argument("--llm", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument("--guard", default=str(GUARD_MODEL_PATH))
    parser.add_argument("--embedder", default=str(DEFAULT_EMBEDDER_DIR))
    parser.add_argument("--embedder-random-weights", action="store_true",
                        help="the embedder's architecture with random weights (where its 87 MB cannot travel)")
    parser.add_argument("--budgets", default="0.30,0.10,0.02", help="fractions of the device: llm,guard,embedder")
    parser.add_argument("--requests", type=int, default=96, help="pipeline requests per configuration")
    parser.add_argument("--rate", type=float, default=24.0, help="pipeline arrivals per second (Poisson)")
    parser.add_argument("--chapters", type=int, default=None, help="chapters per novel in the index (default: all)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--attention-backend", default="auto", choices=("auto", "triton", "torch"))
    parser.add_argument("--tiny", action="store_true", help="small shapes, to check the benchmark on a CPU")


def _dtype(device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def run(args) -> dict:
    torch.manual_seed(0)
    device = labkit.DEVICE
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU check shares its cores; a second thread only waits for them
    dtype = _dtype(device)
    tiny = args.tiny
    n_req = 6 if tiny else args.requests
    seqs, tokens = (8, 512) if tiny else (64, 4096)
    llm_cfg = EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=tokens, attention_backend=args.attention_backend)
    guard_cfg = EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=tokens, max_model_len=512,
                             attention_backend=args.attention_backend)
    embed_batch = 8 if tiny else 64
    total, device_name = device_memory_bytes(device)
    fractions = [float(x) for x in args.budgets.split(",")]
    if len(fractions) != 3:
        raise SystemExit(f"--budgets takes three fractions (llm,guard,embedder), got {args.budgets!r}")
    budgets = dict(zip(("llm", "guard", "embedder"), (int(f * total) for f in fractions)))

    # --- load and profile (vLLM's order: every model's weights, then each profile run, then the pools) ----
    t0 = time.perf_counter()
    llm_model, llm_tok = load_pretrained(args.llm, dtype=dtype, device=device)
    guard_model, guard_tok = load_pretrained(args.guard, dtype=dtype, device=device)
    embedder = load_embedder(args.embedder, dtype=dtype, device=device, random_weights=args.embedder_random_weights)
    load_s = time.perf_counter() - t0
    estimates = [estimate_llm("llm", llm_model.config, llm_cfg, dtype),
                 estimate_llm("guard", guard_model.config, guard_cfg, dtype),
                 estimate_encoder("embedder", embedder.model.config, embed_batch, embedder.max_seq_length, dtype)]
    profiles = [profile_llm("llm", llm_model, llm_cfg), profile_llm("guard", guard_model, guard_cfg),
                profile_encoder("embedder", embedder, embed_batch)]
    for p, e in zip(profiles, estimates):
        print(f"{p.name}: weights {p.weight_bytes / 2**20:.1f} MiB, activations {p.activation_bytes / 2**20:.1f} MiB "
              f"({p.method}); estimate {e.activation_bytes / 2**20:.1f} MiB")

    # --- KV capacity against budget --------------------------------------------------------------------
    llm_p = profiles[0]
    capacity = []
    for frac in ([0.001, 0.01, 0.05] if tiny else [0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]):
        b = max(int(frac * total), llm_p.min_budget_bytes)
        p = plan_memory(total, {"llm": b}, [llm_p], device_name)["llm"]
        capacity.append({"budget_fraction": frac, "budget_bytes": b, "num_blocks": p.num_blocks,
                         "full_length_seqs": p.num_blocks // llm_p.blocks_per_seq,
                         "max_concurrent_seqs": p.max_concurrent_seqs()})
    others = pool_as_others_grow(profiles, total, "llm", utilization=0.9, points=6 if tiny else 16)

    # --- the plan and the engines it sizes ---------------------------------------------------------------
    plan = plan_memory(total, budgets, profiles, device_name)
    print(plan.table())
    if tiny:  # a CPU check allocates small pools, whatever the plan allows
        pools = {"llm": min(plan["llm"].num_blocks, 256), "guard": min(plan["guard"].num_blocks, 256)}
    else:
        pools = {"llm": plan["llm"].num_blocks, "guard": plan["guard"].num_blocks}
    llm_engine = LLMEngine(llm_model, dataclasses.replace(llm_cfg, num_blocks=pools["llm"]), clock="wall")
    guard = Guard(guard_model, guard_tok, dataclasses.replace(guard_cfg, num_blocks=pools["guard"]))
    llm_engine.runner.capture_all(seqs)  # CUDA graphs for decode before anything is timed (no-op on CPU)
    if device.type == "cuda":
        torch.cuda.synchronize()
        resident = {"memory_allocated": torch.cuda.memory_allocated(), "max_memory_allocated":
                    torch.cuda.max_memory_allocated(), "memory_reserved": torch.cuda.memory_reserved()}
    else:
        resident = None

    # --- the pipeline with 1, 2, 3 models ----------------------------------------------------------------
    passages = austen_passages(max_chapters_per_novel=1 if tiny else args.chapters, max_chars=300 if tiny else 800)
    t0 = time.perf_counter()
    index = PassageIndex(embedder, passages, batch_size=embed_batch)
    index_s = time.perf_counter() - t0
    questions = load_questions(n_req, unsafe_every=8)
    arrivals = poisson_arrivals(n_req, args.rate, seed=0)
    pipeline_rows = []
    for guard_on, index_on in ((False, False), (False, True), (True, True)):
        pipe = RAGPipeline(llm_engine, llm_tok, index=index if index_on else None, guard=guard if guard_on else None,
                           max_tokens=args.max_tokens, embed_batch=embed_batch)
        pipe.serve(load_questions(min(4, n_req)), max_seconds=120)  # warm-up (compiles, graph buckets)
        run_ = pipe.serve(questions, arrivals, max_seconds=60 if tiny else 300)
        row = run_.summary()
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
        pipeline_rows.append(row)
    sample = pipe.answer(questions[0])

    # --- contention: the LLM decoding beside the guard classifying -------------------------------------------
    guard_prompts = [guard.prompt_ids(q) for q in load_questions(16 if tiny else 256)]
    workloads = {"llm": make_workload(llm_model.config.vocab_size, 8 if tiny else 64, 32, 16 if tiny else 128),
                 "guard": [(p, SamplingParams(max_tokens=1, ignore_eos=True)) for p in guard_prompts]}
    engines = {"llm": llm_engine, "guard": guard.engine}
    run_contention(engines, {k: v[:2] for k, v in workloads.items()}, "alone")  # warm-up
    contention = []
    for mode in ("alone", "time-sliced", "concurrent"):
        res = run_contention(engines, workloads, mode, max_seconds=120 if tiny else 300)
        for name, r in res["runs"].items():
            contention.append({"mode": mode, "engine": name, "seconds": r.seconds, "steps": r.steps,
                               "step_ms": r.step_seconds_mean * 1e3, "output_tokens": r.output_tokens,
                               "requests": len(workloads[name]), "tok_s": r.tok_s, "makespan_s": res["makespan_s"]})
    guard.runner.scores.clear()
    return {
        "device_memory": {"name": device_name, "bytes": total},
        "models": {"llm": str(args.llm), "guard": str(args.guard), "embedder": str(args.embedder),
                   "dtype": str(dtype).removeprefix("torch."), "load_s": load_s},
        "engine_configs": {"llm": dataclasses.asdict(llm_cfg), "guard": dataclasses.asdict(guard_cfg),
                           "embedder": {"max_batch": embed_batch, "max_seq_length": embedder.max_seq_length}},
        "profiles": [p.to_dict() for p in profiles],
        "estimates": [e.to_dict() for e in estimates],
        "kv_capacity": capacity,
        "pool_as_others_grow": others,
        "plan": {"budgets": budgets, "num_blocks": {m.name: m.num_blocks for m in plan.models},
                 "max_concurrent_seqs": {m.name: m.max_concurrent_seqs() for m in plan.models},
                 "pools_allocated": pools, "cuda_memory_after_engines": resident},
        "index": {"passages": len(index), "build_s": index_s, "faiss": "IndexFlatIP"},
        "pipeline": {"requests": n_req, "rate_per_s": args.rate, "max_tokens": args.max_tokens, "rows": pipeline_rows,
                     "sample": {"question": sample.question, "passage": sample.passage.ref if sample.passage else None,
                                "p_unsafe": sample.p_unsafe, "answer": sample.answer}},
        "contention": contention,
    }
