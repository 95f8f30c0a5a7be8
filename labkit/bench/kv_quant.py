"""Quantised-KV paged decode on the GPU: int8 / fp8 codes + per-(token, head) scales against the fp16
paged kernel, same block tables, same shapes.

What it measures. One decode step of attention (one query token per sequence), 32 query / 8 KV heads,
head_dim 128, block size 16, queries in fp16, every sequence's blocks a random permutation of the
cache. Implementations:

    fp16_v2     kernels/paged_attention.py v2 over an fp16 cache (one program per (KV head, sequence))
    fp16_auto   the same kernel family, "auto" (v3 split-K when v2 would leave the GPU idle)
    int8_v2     kernels/paged_attention_int8kv.py over int8 codes + fp32 scales (v2's loop structure), with
                the fastest launch setting of a small sweep (the int8_v2_tune rows; ``config`` says which)
    fp8_v2      the same kernel over fp8 e4m3 codes, with int8's setting

``kv_bytes`` counts what each must read: fp16 2 x B x L x 8 x 128 x 2 B; int8/fp8 2 x B x L x 8 x (128 + 4) B.
``gbps`` = kv_bytes / median time (triton's do_bench median, L2 flushed). ``speedup_vs_fp16_v2`` is the
number the notebook plots: the byte saving turned into time, or not. ``rel_err`` compares each output
with its own fp32 reference on two sequences; ``err_vs_fp16`` is the quantisation error itself (the
quantised kernels' output against the fp16 kernel's on the same, unquantised K/V).

The cache-write rows time one decode step's writes (B new tokens): plain copy vs quantise-on-write.

``python -m labkit.bench kv_quant`` -> data/bench/kv_quant.json.
"""
from __future__ import annotations


import torch

from kernels import paged_attention as pa
from kernels import paged_attention_int8kv as pq
from kernels.cache_write import cache_write
from labkit.bench import record
from labkit.bench.record import measure, rel_err

SHAPES = ((16, 4096), (64, 4096), (128, 2048), (256, 1024))  # (batch, context)
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
CHECK_SEQS = 2
# (BLOCK_N, num_warps, num_stages) tried for int8 at every shape; the fastest correct one is the int8_v2 row,
# and fp8_v2 runs with it. (Each is one compile on the GPU machine.)
TUNE = ((32, 4, 3), (64, 4, 1), (64, 4, 2), (64, 4, 3), (128, 4, 1), (128, 4, 2), (128, 4, 3), (256, 4, 2),
        (128, 8, 3))


def add_arguments(parser):
    parser.add_argument("--shapes", default=",".join(f"{b}x{c}" for b, c in SHAPES))
    parser.add_argument("--rep-ms", type=int, default=100)


def make_inputs(batch, context, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, device="cuda", dtype=torch.float16, generator=gen)
    v = torch.randn(shape, device="cuda", dtype=torch.float16, generator=gen)
    k[..., :4] *= 6  # a few outlier channels, as real keys have
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).view(batch, blocks_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=torch.float16, generator=gen)
    inp = dict(q=q, k_cache=k, v_cache=v, block_tables=tables, seq_lens=seq_lens)
    slots = torch.arange(num_blocks * BLOCK_SIZE, device="cuda")
    for fmt in ("int8", "fp8"):
        qdtype = pq.KV_FORMATS[fmt][0]
        codes = [torch.empty(shape, dtype=qdtype, device="cuda") for _ in range(2)]
        scales = [torch.empty(shape[:3], dtype=torch.float32, device="cuda") for _ in range(2)]
        pq.cache_write_quant(k.view(-1, NUM_KV_HEADS, HEAD_DIM), v.view(-1, NUM_KV_HEADS, HEAD_DIM),
                             codes[0], codes[1], scales[0], scales[1], slots)
        inp[fmt] = (codes[0], codes[1], scales[0], scales[1])
    return inp


def run(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU; on the CPU replot data/bench/kv_quant.json")
    shapes = list(record.parse_shapes(args.shapes))
    copy_gbps = record.copy_bandwidth_gbps()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows = []
    for batch, context in shapes:
        inp = make_inputs(batch, context)
        n = CHECK_SEQS
        base = (inp["q"], inp["k_cache"], inp["v_cache"], inp["block_tables"], inp["seq_lens"])
        ref16 = pa.paged_attention_ref(inp["q"][:n].float(), inp["k_cache"], inp["v_cache"],
                                       inp["block_tables"][:n], inp["seq_lens"][:n]).float()
        common = dict(batch=batch, context=context)
        b16 = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * 2
        b8 = 2 * batch * context * NUM_KV_HEADS * (HEAD_DIM + 4)
        shape_rows = [
            measure("fp16_v2", lambda: pa.paged_attention(*base, version="v2"), ref16, b16, args.rep_ms, **common),
            measure("fp16_auto", lambda: pa.paged_attention(*base, version="auto"), ref16, b16, args.rep_ms, **common),
        ]
        best_cfg = None
        for fmt in ("int8", "fp8"):
            caches = inp[fmt]
            qargs = (inp["q"], *caches, inp["block_tables"], inp["seq_lens"])
            ref = pq.paged_attention_int8kv_ref(inp["q"][:n].float(), *caches, inp["block_tables"][:n],
                                                inp["seq_lens"][:n]).float()
            if fmt == "int8":  # launch settings: 1-byte tiles may want another tile size than fp16's
                tune = []
                for bn, w, st in TUNE:
                    cfg = dict(BLOCK_N=bn, num_warps=w, num_stages=st)
                    tune.append(measure("int8_v2_tune", lambda cfg=cfg: pq.paged_attention_int8kv(*qargs, **cfg),
                                        ref, b8, args.rep_ms, config=cfg, **common))
                ok = [r for r in tune if "median_ms" in r and r["rel_err"] < 1e-2]
                best_cfg = min(ok, key=lambda r: r["median_ms"])["config"] if ok else None
                shape_rows += tune
            launch = best_cfg or {}
            row = measure(f"{fmt}_v2", lambda: pq.paged_attention_int8kv(*qargs, **launch), ref, b8, args.rep_ms,
                          config=launch or pq.GPU_CONFIG, **common)
            if "error" not in row:
                row["err_vs_fp16"] = rel_err(pq.paged_attention_int8kv(*qargs, **launch), ref16)
            shape_rows.append(row)
        fp16 = shape_rows[0].get("median_ms")
        for r in shape_rows:
            if fp16 and "median_ms" in r:
                r["speedup_vs_fp16_v2"] = fp16 / r["median_ms"]
                r["frac_of_copy"] = r["gbps"] / copy_gbps
        rows += shape_rows
        for r in shape_rows:
            print(_fmt(r), flush=True)

        # one decode step's cache writes: batch new tokens
        k_new = torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
        v_new = torch.randn_like(k_new)
        slots = (inp["block_tables"][:, -1].long() * BLOCK_SIZE + BLOCK_SIZE - 1)
        wb16 = 2 * 2 * batch * NUM_KV_HEADS * HEAD_DIM * 2  # read + write, K and V
        wb8 = 2 * batch * NUM_KV_HEADS * (HEAD_DIM * 2 + HEAD_DIM + 4)
        rows.append(measure("write_fp16", lambda: cache_write(k_new, v_new, inp["k_cache"], inp["v_cache"], slots),
                            None, wb16, args.rep_ms, **common))
        rows.append(measure("write_int8", lambda: pq.cache_write_quant(k_new, v_new, *inp["int8"], slots),
                            None, wb8, args.rep_ms, **common))
        print(_fmt(rows[-2]), flush=True)
        print(_fmt(rows[-1]), flush=True)
        del inp
        torch.cuda.empty_cache()
    return dict(
        shapes=dict(batch_x_context=[list(s) for s in shapes], num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS,
                    head_dim=HEAD_DIM, block_size=BLOCK_SIZE, query_dtype="fp16",
                    block_tables="random permutation of all blocks"),
        copy_gbps=copy_gbps,
        launch_config={"fp16": pa.GPU_CONFIG, "int8/fp8": pq.GPU_CONFIG},
        rows=rows,
    )


def _fmt(r) -> str:
    head = f"{r['impl']:13s} {r['batch']:4d}x{r['context']:<5d}"
    if "error" in r:
        return f"{head} ERROR {r['error'][:150]}"
    extra = f" x{r['speedup_vs_fp16_v2']:.2f} vs fp16_v2" if "speedup_vs_fp16_v2" in r else ""
    err = f" err {r['rel_err']:.1e}" if "rel_err" in r else ""
    q = f" quant-err {r['err_vs_fp16']:.1e}" if "err_vs_fp16" in r else ""
    cfg = f" {r['config']}" if "config" in r else ""
    return f"{head} {r['median_ms']:.4f} ms {r['gbps']:6.0f} GB/s{extra}{err}{q}{cfg}"
