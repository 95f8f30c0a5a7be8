"""Where paged decode attention's time goes at small batch: hardware counters of v3, v4 and SDPA.

Why. paged_attention records each kernel's KV bytes a second; issue 16 asks for >= 85% of the copy bandwidth at
1 x 65536 and 4 x 16384, and v3 stops near 79% there. This runs labkit's v3 (a split kernel and a reduce kernel),
v4 (one launch, the last partition merges) and torch's dense SDPA on those shapes (fp16, 32 query / 8 KV heads,
head_dim 128, blocks of 16 in a shuffled table: paged_attention's inputs) under Nsight Compute, with
quant_profile's machinery, and records per kernel:

    kernel_us, dram_gbps, pct_of_copy          the kernel alone, the DRAM bytes it moved a second
    occupancy_achieved / theoretical, waves    warps resident, and the grid over what the GPU holds at once
    issue_active_pct, stalls                   as in quant_profile
    graph_us                                   the whole call (v3: both kernels) as one CUDA-graph replay

GPU: ``python -m labkit.bench paged_profile`` (needs ncu, as quant_profile).
"""
from __future__ import annotations

import json
import sys

import torch

SHAPES = ((1, 65536), (4, 16384))  # (batch, context): issue 16's small-batch target shapes
IMPLS = {  # name -> the kernels its call launches, in order (None: a library's, any name)
    "labkit_v3": ("_paged_attention_v3_split_kernel", "_paged_attention_v3_reduce_kernel"),
    "labkit_v4": ("_paged_attention_v4_kernel",),
    "sdpa_dense": (None,),
}


def _inputs(batch: int, context: int):
    from labkit.bench.paged_attention import impl_fns, make_inputs

    inp = make_inputs(batch, context, torch.float16)
    return impl_fns(inp, list(IMPLS))


def _child(manifest_path: str, shapes=SHAPES) -> None:
    import labkit  # noqa: F401
    from labkit.bench.quant_profile import profile_calls

    manifest = []
    for batch, context in shapes:
        fns = _inputs(batch, context)
        manifest += profile_calls([(fn, [{"kernel": f"{name}#{part}", "n": batch, "k": context, "pattern": pattern}
                                         for part, pattern in enumerate(IMPLS[name])]) for name, fn in fns.items()])
        del fns
        torch.cuda.empty_cache()
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


def run(args) -> dict:
    from labkit.bench import record
    from labkit.bench.paged_attention import kv_bytes
    from labkit.bench.quant_profile import match, run_under_ncu, summarise

    if not torch.cuda.is_available():
        raise SystemExit("paged_profile profiles GPU kernels; on the CPU replot data/bench/paged_profile.json")
    copy_gbps = record.copy_bandwidth_gbps()
    rows = []
    for batch, context in SHAPES:
        fns = _inputs(batch, context)
        for name, fn in fns.items():
            fn()
            graph = record.time_ms(record.graphed(fn)) * 1e3
            nbytes = kv_bytes(batch, context, torch.float16)
            rows.append({"impl": name, "batch": batch, "context": context, "kv_bytes": nbytes, "graph_us": graph,
                         "graph_pct_of_copy": 100 * nbytes / graph / 1e3 / copy_gbps, "kernels": []})
            print(f"{name:12s} {batch}x{context}  graph {graph:6.1f} us  {rows[-1]['graph_pct_of_copy']:4.0f}% copy",
                  flush=True)
        del fns
        torch.cuda.empty_cache()
    manifest, ncu_rows = run_under_ncu("labkit.bench.paged_profile", [",".join(f"{b}x{c}" for b, c in SHAPES)])
    by_key = {(r["impl"], r["batch"], r["context"]): r for r in rows}
    for entry, main, extras in match(manifest, ncu_rows):
        impl = entry["kernel"].split("#")[0]
        for row in (*extras, main):  # extras: a library's other kernels, or a fill before a labkit kernel
            p = summarise(row, 1, 1, copy_gbps)
            p.pop("thread_instr_per_weight", None)  # no weights here
            p.pop("dram_columns", None)
            p["name"] = row.get("Kernel Name", "")[:80]
            by_key[(impl, entry["n"], entry["k"])]["kernels"].append(p)
        print(f"{impl:12s} {entry['n']}x{entry['k']}  {p['name'][:40]:40s} {p['kernel_us'] or 0:6.1f} us  "
              f"{p['pct_of_copy'] or 0:4.0f}% copy  occ {p['occupancy_achieved_pct'] or 0:3.0f}/"
              f"{p['occupancy_theoretical_pct'] or 0:.0f}%  waves {p['waves_per_sm'] or 0:.2f}  "
              f"issue {p['issue_active_pct'] or 0:3.0f}%  stalls {list(p['stalls'].items())[:3]}", flush=True)
    return {"shapes": {"batch_context": [list(s) for s in SHAPES], "dtype": "float16"}, "copy_gbps": copy_gbps,
            "rows": rows}


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    from labkit.bench.record import parse_shapes

    _child(sys.argv[2], parse_shapes(sys.argv[3]))
