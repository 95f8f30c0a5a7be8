"""Tensor parallelism on 2 GPUs: memory per GPU, all-reduce time per layer, decode step and throughput.

For TP = 1 and TP = 2 (NCCL, one process per GPU), on the engine benchmark's 1B-class Llama (bf16, random
weights) and on a larger model whose KV cache at the wanted concurrency does not fit one GPU's budget:

    weight_bytes_per_gpu, kv_bytes_per_gpu, peak_bytes_per_gpu   what each rank holds
    allreduce_us                                                  one (batch, hidden) bf16 all-reduce
    step_ms                                                       one decode step at --batch sequences
    output_tok_s                                                  a closed batch of requests to completion

Needs at least 2 GPUs: ``python -m labkit.bench tensor_parallel``. NCCL's NVLink multicast stays as the
machine sets it (NCCL_NVLS_ENABLE=0). CPU smoke run: ``python -m labkit.bench tensor_parallel --quick
--backend gloo --out /tmp/tp.json``.
"""
from __future__ import annotations

import json
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

MODELS = {
    "llama_1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=8192,
                     rope_theta=500000.0, tie_word_embeddings=True),
    "llama_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                     rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
}


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (a CPU smoke run with gloo)")
    parser.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    parser.add_argument("--models", default="llama_1b,llama_8b")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--kv-budget-gb", type=float, default=40.0, help="KV pool per GPU")


def _bench_worker(rank, world, port, backend, model_name, args, out_file):
    import os

    from labkit.config import LlamaConfig
    from labkit.engine import EngineConfig, LLMEngine, SamplingParams
    from labkit.model import LlamaForCausalLM
    from labkit.tensor_parallel import TensorParallelRunner, shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        dtype = torch.bfloat16 if backend == "nccl" else torch.float32
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**MODELS[model_name]))
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        model = model.to(dtype).eval()
        if world > 1:
            shard_model(model, rank, world)
        c = model.config
        per_block = 2 * c.num_hidden_layers * 16 * c.num_key_value_heads * c.head_dim * model.lm_head.weight.element_size()
        num_blocks = max(64, int(args["kv_budget_gb"] * 1e9) // per_block)
        cfg = EngineConfig(num_blocks=num_blocks, block_size=16, max_num_seqs=args["batch"],
                           max_num_batched_tokens=8192)
        runner = TensorParallelRunner(model, cfg, c.max_position_embeddings)
        engine = LLMEngine(model, cfg, runner=runner, eos_token_ids=())
        gen = torch.Generator().manual_seed(0)
        steps = args["steps"]
        for _ in range(args["batch"]):
            prompt = torch.randint(0, c.vocab_size, (args["context"],), generator=gen).tolist()
            engine.add_request(prompt, SamplingParams(max_tokens=steps * 2 + 64, ignore_eos=True))
        runner.capture_all(args["batch"])
        while any(s.num_output_tokens == 0 for s in engine.requests.values()):
            engine.step()
        sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
        times = []
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            engine.step()
            sync()
            times.append(time.perf_counter() - t)
        x = torch.randn(args["batch"], c.hidden_size, dtype=dtype, device=device)
        ar = []
        for _ in range(50 if backend == "nccl" else 5):
            sync()
            t = time.perf_counter()
            dist.all_reduce(x)
            sync()
            ar.append(time.perf_counter() - t)
        step_ms = float(np.median(times)) * 1e3
        row = {"model": model_name, "tp": world, "rank": rank, "batch": args["batch"], "context": args["context"],
               "num_blocks": num_blocks, "max_concurrent_at_context": num_blocks * 16 // (args["context"] + steps * 2 + 64),
               "weight_bytes_per_gpu": sum(p.numel() * p.element_size()
                                           for p in {id(p): p for p in model.parameters()}.values()),
               "kv_bytes_per_gpu": 2 * runner.store.k_cache.numel() * runner.store.k_cache.element_size(),
               "peak_bytes_per_gpu": torch.cuda.max_memory_allocated(device) if backend == "nccl" else None,
               "allreduce_us": float(np.median(ar)) * 1e6 if world > 1 else 0.0,
               "allreduces_per_step": 2 * c.num_hidden_layers + 1 if world > 1 else 0,
               "step_ms": step_ms, "output_tok_s": args["batch"] / (step_ms * 1e-3)}
        with open(f"{out_file}.{model_name}.{world}.{rank}", "w") as f:
            json.dump(row, f)
    finally:
        dist.destroy_process_group()


def run(args) -> dict:
    import torch.multiprocessing as mp

    from labkit.tensor_parallel import free_port

    if args.quick:
        args.models, args.batch, args.context, args.kv_budget_gb = "tiny", 4, 32, 0.001
    if args.backend == "nccl" and torch.cuda.device_count() < 2:
        raise SystemExit(f"tensor_parallel needs 2 GPUs, this machine has {torch.cuda.device_count()}: "
                         "run it on a 2-GPU machine, or `--quick --backend gloo` for a CPU smoke run")
    worker_args = {"batch": args.batch, "context": args.context, "kv_budget_gb": args.kv_budget_gb,
                   "steps": 3 if args.quick else 20}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for world in (1, 2):
                mp.start_processes(_bench_worker, args=(world, free_port(), args.backend, name, worker_args,
                                                        f"{tmp}/r"), nprocs=world, start_method="spawn")
                rows.append(json.load(open(f"{tmp}/r.{name}.{world}.0")))
                print(rows[-1], flush=True)
    return {"shapes": {"models": {m: MODELS[m] for m in args.models.split(",")}, "batch": args.batch,
                       "context": args.context, "kv_budget_gb_per_gpu": args.kv_budget_gb,
                       "backend": args.backend}, "rows": rows}
