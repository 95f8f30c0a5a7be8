"""Paged-attention decode on the GPU: labkit's v1/v2/v3/v4 kernels against torch's dense SDPA and
FlexAttention's PagedAttention, as KV bytes read per second.

What it measures. One decode step of attention (one query token per sequence) for batch x context
from 1 x 65536 to 256 x 4096; 32 query / 8 KV heads, head_dim 128, block size 16, fp16 and bf16.
Every sequence's blocks are a random permutation of the cache's blocks (a cache after many
allocations and frees). Each implementation reads the same keys and values:

    labkit_v1..v4    kernels/paged_attention.py over k_cache (num_blocks, 16, 8, 128) + block_tables
    sdpa_dense       torch SDPA (enable_gqa) over the same K/V gathered into contiguous (B, 8, L, 128)
    flex_paged       torch.nn.attention.experimental._paged_attention.PagedAttention + compiled
                     flex_attention, its page table set to the same block table

``gbps`` = K and V bytes read (2 x batch x context x 8 x 128 x 2 B) / median time; the ceiling is the
device-to-device copy bandwidth measured in the same run. ``median_ms``: triton's do_bench median of a
CUDA-graph replay of the call (as serving engines run decode steps), L2 flushed before every replay;
``eager_ms``: the same for plain Python calls, launch overhead included. Each output is checked against
the fp32 reference on a few sequences (rel_err) and the graph replay against the eager call.

Run on a GPU machine: ``python -m labkit.bench paged_attention`` -> data/bench/paged_attention.json.
``--tune`` instead sweeps launch settings of the labkit kernels (fp16) and prints the best ones; ``--tune-versions``
limits it to some kernels. v3 against v4 at small batch, quickly (the summary lines print v4's speed over v3's)::

    python -m labkit.bench paged_attention --shapes 1x65536,4x16384,16x8192 --dtypes fp16 \
        --impls labkit_v3,labkit_v4,sdpa_dense --no-block-sweep --out /tmp/v4.json
"""
from __future__ import annotations

import importlib
import itertools

import torch
import torch.nn.functional as F

from kernels import paged_attention as pa
from labkit.bench import record
from labkit.bench.record import measure

SHAPES = ((1, 65536), (4, 16384), (16, 8192), (64, 4096), (256, 4096))  # (batch, context)
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
VERSIONS = ("v1", "v2", "v3", "v4")
IMPLS = (*(f"labkit_{v}" for v in VERSIONS), "sdpa_dense", "flex_paged")
# block-size sweep (rows carry "block_size"; notebook 04 plots them): labkit "auto" at one shape
SWEEP_SHAPE, SWEEP_DTYPE, SWEEP_BLOCK_SIZES = (64, 4096), "fp16", (1, 4, 16, 64, 256)
CHECK_SEQS = 2  # sequences checked against the fp32 reference per shape
# --tune: launch settings tried for each kernel (BLOCK_N, num_warps, num_stages)
TUNE_V1 = ((32, 4, 2), (64, 4, 2), (64, 8, 2), (128, 8, 2))
TUNE_V23 = ((32, 4, 2), (32, 4, 4), (64, 4, 1), (64, 4, 2), (64, 4, 3), (64, 4, 4),
            (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3))
TUNE_PARTITIONS = (256, 512, 1024, 2048)
# v4: no second launch, so fewer, longer partitions may win at batch <= 4; and the pipeline depth
TUNE_V4 = ((32, 4, 4), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2))
TUNE_V4_PARTITIONS = (512, 1024, 2048, 4096)


def add_arguments(parser):
    parser.add_argument("--shapes", default=",".join(f"{b}x{c}" for b, c in SHAPES), help="e.g. 1x65536,64x4096")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    parser.add_argument("--tune", action="store_true", help="sweep the labkit kernels' launch settings instead")
    parser.add_argument("--tune-versions", default=",".join(VERSIONS), help="kernels --tune sweeps, e.g. v3,v4")
    parser.add_argument("--no-block-sweep", action="store_true", help="skip the block-size sweep")


def make_inputs(batch: int, context: int, dtype: torch.dtype, seed: int = 0, device: str = "cuda",
                block_size: int = BLOCK_SIZE) -> dict:
    """Random q and paged caches with a shuffled block table, plus the same K/V laid out densely."""
    gen = torch.Generator(device=device).manual_seed(seed)
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    v_cache = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    block_tables = torch.randperm(num_blocks, device=device, generator=gen).view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, seq_lens=seq_lens)


def dense_kv(inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hkv, L, D) contiguous copies of each sequence's keys and values."""
    batch = inp["q"].shape[0]
    idx = inp["block_tables"].long()
    return tuple(
        c[idx].view(batch, -1, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()  # (B, Hkv, L, D)
        for c in (inp["k_cache"], inp["v_cache"])
    )


def make_flex_paged(inp: dict, compile: bool = True):
    """FlexAttention's PagedAttention over the same physical blocks; returns a zero-argument callable."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention, noop_mask

    q, k_cache, block_tables = inp["q"], inp["k_cache"], inp["block_tables"]
    batch, blocks_per_seq = block_tables.shape
    num_blocks = k_cache.shape[0]
    device = q.device
    paged = PagedAttention(num_blocks, BLOCK_SIZE, batch, device=device)
    # install our shuffled block table instead of PagedAttention.reserve()'s allocation order
    table = block_tables.long()
    paged.page_table[:, :blocks_per_seq] = table
    paged.physical_to_logical.scatter_(1, table,
                                       torch.arange(blocks_per_seq, device=device).expand(batch, -1).contiguous())
    paged.capacity[:] = blocks_per_seq * BLOCK_SIZE
    paged.empty_pages = []
    # flex's cache layout: (1, Hkv, num_blocks * block_size, D)
    k_flex, v_flex = (
        c.permute(2, 0, 1, 3).reshape(1, NUM_KV_HEADS, num_blocks * BLOCK_SIZE, HEAD_DIM).contiguous()
        for c in (k_cache, inp["v_cache"])
    )
    logical = create_block_mask(noop_mask, batch, 1, 1, blocks_per_seq * BLOCK_SIZE, device=device,
                                BLOCK_SIZE=BLOCK_SIZE)
    block_mask = paged.convert_logical_block_mask(logical)
    if compile:
        torch._dynamo.reset()  # a fresh compile per shape: past 8 recompiles dynamo would fall back to eager
    flex = torch.compile(flex_attention, dynamic=False) if compile else flex_attention
    q4 = q[:, :, None, :]  # (B, Hq, 1, D)
    return lambda: flex(q4, k_flex, v_flex, block_mask=block_mask, enable_gqa=True)[:, :, 0]


def reference(inp: dict) -> torch.Tensor:
    """fp32 reference output of the first CHECK_SEQS sequences (the reference loops in Python)."""
    n = CHECK_SEQS
    q, k_cache, v_cache, block_tables, seq_lens = (inp[k]
                                                   for k in ("q", "k_cache", "v_cache", "block_tables", "seq_lens"))
    return pa.paged_attention_ref(q[:n].float(), k_cache, v_cache, block_tables[:n], seq_lens[:n]).float()


def kv_bytes(batch: int, context: int, dtype: torch.dtype) -> int:
    return 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * torch.finfo(dtype).bits // 8


def impl_fns(inp: dict, impls: list[str]) -> dict:
    """name -> zero-argument callable returning (B, Hq, D). Builds dense / flex copies only when asked."""
    args = (inp["q"], inp["k_cache"], inp["v_cache"], inp["block_tables"], inp["seq_lens"])
    fns = {}
    for v in VERSIONS:
        if f"labkit_{v}" in impls:
            fns[f"labkit_{v}"] = lambda v=v: pa.paged_attention(*args, version=v)
    if "sdpa_dense" in impls:
        k, v = dense_kv(inp)
        q4 = inp["q"][:, :, None, :]  # (B, Hq, 1, D)
        fns["sdpa_dense"] = lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)[:, :, 0]
    if "flex_paged" in impls:
        fns["flex_paged"] = make_flex_paged(inp)
    return fns


def run(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; on the CPU replot data/bench/paged_attention.json")
    shapes = list(record.parse_shapes(args.shapes))
    dtypes = args.dtypes.split(",")
    impls = args.impls.split(",")
    copy_gbps = record.copy_bandwidth_gbps()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows, notes = [], {}
    if "flex_paged" in impls:
        try:
            importlib.import_module("torch.nn.attention.experimental._paged_attention")
        except ImportError as exc:
            notes["flex_paged"] = f"unavailable in torch {torch.__version__}: {exc}"
            impls.remove("flex_paged")
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        for batch, context in shapes:
            inp = make_inputs(batch, context, dtype)
            ref = reference(inp)
            nbytes = kv_bytes(batch, context, dtype)
            common = dict(dtype=dtype_name, batch=batch, context=context, kv_bytes=nbytes)
            if args.tune:
                rows += tune_shape(inp, ref, nbytes, args.rep_ms, common, args.tune_versions.split(","))
            else:
                for name, fn in impl_fns(inp, impls).items():
                    rows.append(measure(name, fn, ref, nbytes, args.rep_ms, **common))
                    print(_fmt(rows[-1], copy_gbps), flush=True)
            del inp
            torch.cuda.empty_cache()
    if not args.tune and not args.no_block_sweep:
        rows += block_size_sweep(args.rep_ms, copy_gbps)
    for row in rows:
        if "gbps" in row:
            row["frac_of_copy"] = row["gbps"] / copy_gbps
    result = dict(
        shapes=dict(batch_x_context=[list(s) for s in shapes], num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS,
                    head_dim=HEAD_DIM, block_size=BLOCK_SIZE, block_tables="random permutation of all blocks",
                    timing="median_ms: CUDA-graph replay; eager_ms: Python calls; do_bench median, L2 flushed"),
        copy_gbps=copy_gbps,
        launch_config=pa.GPU_CONFIG,
        split_k_version=pa.SPLIT_K_VERSION,  # what "auto" ran below V2_MIN_PROGRAMS_PER_SM (block-size sweep)
        rows=rows,
        notes=notes,
    )
    if not args.tune:
        result["summary"] = summarize(rows, copy_gbps)
        for line in result["summary"]:
            print(line)
    return result


def _fmt(row, copy_gbps) -> str:
    if "error" in row:
        return f"{row['impl']:11s} {row['dtype']} {row['batch']:4d}x{row['context']:<6d} ERROR {row['error'][:120]}"
    cfg = f" {row['config']}" if "config" in row else ""
    return (f"{row['impl']:11s} {row['dtype']} {row['batch']:4d}x{row['context']:<6d} {row['median_ms']:.4f} ms "
            f"{row['gbps']:7.0f} GB/s ({row['gbps'] / copy_gbps:.0%} of copy) err {row['rel_err']:.1e}{cfg}")


def summarize(rows, copy_gbps) -> list[str]:
    """One line per (dtype, shape): best labkit version against sdpa_dense, copy bandwidth and flex_paged."""
    lines = []
    key = lambda r: (r["dtype"], r["batch"], r["context"])  # noqa: E731
    main = (r for r in rows if "gbps" in r and "sweep" not in r)
    for k, group in itertools.groupby(sorted(main, key=key), key=key):
        by = {r["impl"]: r for r in group}
        labkit = [r for n, r in by.items() if n.startswith("labkit_")]
        if not labkit:
            continue
        best = max(labkit, key=lambda r: r["gbps"])
        parts = [f"{k[0]} {k[1]}x{k[2]}: best {best['impl']} {best['gbps']:.0f} GB/s = "
                 f"{best['gbps'] / copy_gbps:.0%} of copy"]
        for other in ("sdpa_dense", "flex_paged"):
            if other in by:
                parts.append(f"{best['gbps'] / by[other]['gbps']:.2f}x {other}")
        if "labkit_v3" in by and "labkit_v4" in by:  # the measurement SPLIT_K_VERSION is decided on
            parts.append(f"v4 {by['labkit_v4']['gbps'] / by['labkit_v3']['gbps']:.3f}x v3")
        lines.append(", ".join(parts))
    return lines


def block_size_sweep(rep_ms, copy_gbps) -> list[dict]:
    """labkit's dispatcher at one shape for several block sizes: the cost of the indirection."""
    (batch, context), dtype = SWEEP_SHAPE, DTYPES[SWEEP_DTYPE]
    rows = []
    for block_size in SWEEP_BLOCK_SIZES:
        inp = make_inputs(batch, context, dtype, block_size=block_size)
        args = (inp["q"], inp["k_cache"], inp["v_cache"], inp["block_tables"], inp["seq_lens"])
        version = pa.choose_version(batch, NUM_KV_HEADS, torch.cuda.get_device_properties(0).multi_processor_count)
        rows.append(measure(f"labkit_{version}", lambda: pa.paged_attention(*args), reference(inp),
                            kv_bytes(batch, context, dtype), rep_ms, sweep="block_size", block_size=block_size,
                            dtype=SWEEP_DTYPE, batch=batch, context=context))
        print(_fmt(rows[-1], copy_gbps), f"block_size {block_size}", flush=True)
        del inp
        torch.cuda.empty_cache()
    return rows


def _split_k_trials(version, configs, partitions) -> list[tuple[str, dict]]:
    """(version, launch settings) for every (BLOCK_N, num_warps, num_stages) x partition (None: the default)."""
    return [(version, dict(BLOCK_N=b, num_warps=w, num_stages=s, partition_size=p))
            for (b, w, s), p in itertools.product(configs, (*partitions, None))]


def tune_shape(inp, ref, nbytes, rep_ms, common, versions=VERSIONS) -> list[dict]:
    """Time every launch setting of the given kernels (and sdpa_dense for scale) on one shape; print the best."""
    unknown = set(versions) - set(VERSIONS)
    if unknown:
        raise ValueError(f"--tune-versions: unknown {sorted(unknown)}; choose from {','.join(VERSIONS)}.")
    args = (inp["q"], inp["k_cache"], inp["v_cache"], inp["block_tables"], inp["seq_lens"])
    rows = [measure("sdpa_dense", impl_fns(inp, ["sdpa_dense"])["sdpa_dense"], ref, nbytes, rep_ms, **common)]
    trials = [("v1", dict(BLOCK_N=b, num_warps=w, num_stages=s)) for b, w, s in TUNE_V1]
    trials += [("v2", dict(BLOCK_N=b, num_warps=w, num_stages=s)) for b, w, s in TUNE_V23]
    trials += _split_k_trials("v3", TUNE_V23, TUNE_PARTITIONS) + _split_k_trials("v4", TUNE_V4, TUNE_V4_PARTITIONS)
    trials = [(v, cfg) for v, cfg in trials if v in versions]
    for version, cfg in trials:
        fn = lambda: pa.paged_attention(*args, version=version, **cfg)  # noqa: E731
        rows.append(measure(f"labkit_{version}", fn, ref, nbytes, rep_ms, config=cfg, **common))
    sdpa = rows[0].get("gbps", float("nan"))
    for version in versions:
        ok = [r for r in rows if r["impl"] == f"labkit_{version}" and "gbps" in r and r["rel_err"] < 2e-2]
        ok.sort(key=lambda r: -r["gbps"])
        for r in ok[:3]:
            print(f"TUNE {common['dtype']} {common['batch']}x{common['context']} {version} {r['gbps']:7.0f} GB/s "
                  f"{r['gbps'] / sdpa:.2f}x sdpa {r['config']}", flush=True)
    print(f"TUNE {common['dtype']} {common['batch']}x{common['context']} sdpa {sdpa:7.0f} GB/s", flush=True)
    return rows
