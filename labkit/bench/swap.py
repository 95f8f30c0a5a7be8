"""Preemption by swap on the GPU: how fast the engine's store moves blocks to pinned host memory and back.

What it measures. ``PagedKVStore.swap_out`` / ``swap_in`` (labkit/engine/kv_store.py: one indexed copy per
K and V over every layer) for n blocks of a Llama-3-8B-shaped store (32 layers, 8 KV heads, head_dim 128,
bf16, block 16: 4 MiB of K and V per block), into the pinned swap space the engine's runner allocates.
Rows: ``impl`` "swap_out" | "swap_in", ``blocks``, ``bytes``, ``median_ms`` (CUDA events, median of
``--repeats`` runs after a warm-up), ``gbps`` = bytes / time. Notebook 07's SimulatedRunner takes its
``swap_bytes_per_s`` from the 64-block rows.

``python -m labkit.bench swap`` -> data/bench/swap.json. ``--tiny`` runs a small store on the CPU (for tests;
its numbers are a CPU memcpy, not a host link, and are never recorded).
"""
from __future__ import annotations

import statistics
import time

import torch

from labkit.config import LlamaConfig
from labkit.engine.kv_store import PagedKVStore

BLOCKS = (1, 8, 64, 256)


def add_arguments(parser):
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="a small store on the CPU (a smoke test)")


def _config(tiny: bool) -> LlamaConfig:
    if tiny:
        return LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128)


def _time_ms(fn, repeats: int, on_gpu: bool) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def run(args) -> dict:
    on_gpu = torch.cuda.is_available() and not args.tiny
    if not on_gpu and not args.tiny:
        raise SystemExit("this benchmark needs a CUDA GPU (or --tiny for a CPU smoke test); on the CPU notebook 07 "
                         "reads data/bench/swap.json")
    device = "cuda" if on_gpu else "cpu"
    config = _config(args.tiny)
    blocks = BLOCKS if not args.tiny else (1, 4)
    num_blocks = 2 * max(blocks)
    store = PagedKVStore(config, num_blocks, 16, dtype=torch.bfloat16, device=device)
    shape = (store.k_cache.shape[0], max(blocks)) + tuple(store.k_cache.shape[2:])
    cpu_k = torch.zeros(shape, dtype=store.k_cache.dtype, pin_memory=on_gpu)
    cpu_v = torch.zeros_like(cpu_k, pin_memory=on_gpu)
    rows = []
    for n in blocks:
        dev = torch.randperm(num_blocks)[:n].tolist()  # scattered device blocks, as after a while of serving
        pairs_out = list(zip(dev, range(n)))
        pairs_in = list(zip(range(n), dev))
        nbytes = n * store.bytes_per_block
        for impl, fn in (("swap_out", lambda: store.swap_out(pairs_out, cpu_k, cpu_v)),
                         ("swap_in", lambda: store.swap_in(pairs_in, cpu_k, cpu_v))):
            ms = _time_ms(fn, args.repeats, on_gpu)
            rows.append({"impl": impl, "blocks": n, "bytes": nbytes, "median_ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9})
            print(f"{impl:8s} {n:4d} blocks ({nbytes / 2**20:7.1f} MiB): {ms:8.3f} ms  {rows[-1]['gbps']:6.1f} GB/s")
    return {"shapes": {"num_hidden_layers": config.num_hidden_layers, "num_key_value_heads": config.num_key_value_heads,
                       "head_dim": config.head_dim, "block_size": 16, "dtype": "bfloat16",
                       "bytes_per_block": store.bytes_per_block, "pinned": on_gpu,
                       "timing": "CUDA events, median" if on_gpu else "perf_counter, median (CPU smoke test)"},
            "rows": rows}


def swap_bytes_per_s(data: dict, blocks: int = 64) -> float:
    """Bytes per second of one swap direction, averaged over out and in, at ``blocks`` blocks."""
    rates = [r["gbps"] for r in data["rows"] if r["blocks"] == blocks]
    if not rates:
        raise ValueError(f"swap.json has no {blocks}-block rows; re-record with `python -m labkit.bench swap`")
    return 1e9 * sum(rates) / len(rates)
