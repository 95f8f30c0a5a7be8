"""Where a batch-1 weight-only GEMV's time goes: hardware counters, alone and in a stream of calls.

Why. quant_matmul records each GEMV's time against fp16 cuBLAS; this records why it is that time. For each GEMV of
quant_sass (int8, int4 g128 and ternary, the first version and the word-wise one, at their default configurations)
and fp16 cuBLAS, on the three Llama-3-8B shapes at m = 1, fp16 x:

    graph_us     one CUDA-graph replay, L2 cleared before it (quant_matmul's timing)
    stream_us    one call inside a graph of R back-to-back calls, each on its own copy of the weights (R copies
                 are > 4x the L2, so every weight still comes from HBM): what a linear costs inside a decode step,
                 where the next kernel's launch is already queued and no cache clearing dirties the L2
    ncu          Nsight Compute on one call (its own replays, caches flushed, clocks left alone):
      sm_clock_hz        the SMs' clock while it ran (left alone: whatever the card chose)
      kernel_us          the kernel alone (gpu__time_duration): graph_us - kernel_us is the launch and timing gap
      dram_gbps          bytes read + written in DRAM over kernel_us; pct_of_copy against the copy bandwidth
      occupancy          achieved warps a cycle over the SM's 64, and the theoretical maximum
      issue_active_pct   of cycles a scheduler issued an instruction
      thread_instr_per_weight   thread instructions executed over the n x k weights: the unpacking cost
      l1_pct / l2_pct    L1 and L2 throughput, of peak
      dram_columns       ncu's raw DRAM counters, as it printed them
      stalls             per issued instruction, how many cycles warps spent waiting, by reason
                         (long_scoreboard: a load from memory; lg_throttle: the load queue full; ...)

``--m 16``: the same for the tensor-core kernels of small batches (int8 and int4 GEMM, int4 swap-AB), where issue 16's
m = 16 target is set. GPU: ``python -m labkit.bench quant_profile`` (needs ``ncu`` on the PATH or Nsight Compute
under /opt/nvidia).
The profiled child is this module with ``--child``; it writes which kernel each launch was.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys

import torch
import torch.nn.functional as F

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # (n, k): q/o, gate/up, down of Llama-3-8B
STREAM_BYTES = 256 * 2**20  # R copies of the smallest weight reach at least this (> 4x the H200's 60 MB L2)
MAX_COPIES = 64
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats", "InstructionStats",
            "MemoryWorkloadAnalysis")
METRICS = {  # recorded name -> ncu raw metric
    "kernel_ns": "gpu__time_duration.sum",
    "sm_clock_hz": "sm__cycles_elapsed.avg.per_second",
    "dram_read_bytes": "dram__bytes_read.sum",
    "dram_write_bytes": "dram__bytes_write.sum",
    "dram_pct_of_peak": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "occupancy_achieved_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "occupancy_theoretical_pct": "sm__maximum_warps_per_active_cycle_pct",
    "registers_per_thread": "launch__registers_per_thread",
    "grid_size": "launch__grid_size",
    "block_size": "launch__block_size",
    "waves_per_sm": "launch__waves_per_multiprocessor",
    "blocks_limit_registers": "launch__occupancy_limit_registers",
    "blocks_limit_warps": "launch__occupancy_limit_warps",
    "warp_instructions": "smsp__inst_executed.sum",
    "threads_per_instruction": "smsp__thread_inst_executed_per_inst_executed.ratio",
    "issue_active_pct": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "l1_pct": "l1tex__throughput.avg.pct_of_peak_sustained_active",
    "l2_pct": "lts__throughput.avg.pct_of_peak_sustained_elapsed",
}
EXTRA_METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum", "sm__cycles_elapsed.avg.per_second",
                 "sm__cycles_elapsed.avg")  # asked for by name; dropped if ncu refuses them
_STALL = re.compile(r"^smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio$")


def kernels(n: int, k: int, m: int = 1) -> dict:
    """name -> (launch callable(x), kernel-name regex, config), one shape: at m = 1 quant_sass's GEMVs, at m > 1
    the tensor-core kernels (int8 and int4 GEMM, int4 swap-AB); fp16 cuBLAS first."""
    w = (torch.randn(n, k, device="cuda") * 0.02).half()
    out = {"fp16 cuBLAS": (lambda x, w=w: F.linear(x, w), None, None)}
    if m > 1:
        return {**out, **_batched_kernels(w)}
    from labkit.bench.quant_sass import _kernels

    for name, (jit_fn, launch, _, cfg) in _kernels(n, k).items():
        out[name] = (launch, re.escape(jit_fn.fn.__name__ if hasattr(jit_fn, "fn") else jit_fn.__name__), cfg)
    return out


def _batched_kernels(w: torch.Tensor) -> dict:
    """The m = 2-16 kernels of int8 and int4 g128 at their default-path configurations (quant_matmul's rows)."""
    from kernels import quant_matmul as qm
    from labkit.quant import quantize_tensor

    n, k = w.shape
    q8, q4 = quantize_tensor(w, "int8"), quantize_tensor(w, "int4_g128")
    int8_gemm = qm.default_config("int8", 16, n, k)
    int4_gemm = dict(path="gemm", BLOCK_M=16, BLOCK_N=32, GROUPS=2, num_warps=4, num_stages=4)
    split_k = max(1, min(4, 256 // -(-n // 64), k // 1024))  # default_config's split for swap-AB
    swap_ab = dict(path="small_m", BLOCK_N=64, BLOCK_M=16, GROUPS=2, num_warps=4, num_stages=3,
                   **({"SPLIT_K": split_k} if split_k > 1 else {}))
    int4 = lambda cfg: lambda x: qm.int4_matmul(x, q4.qweight, q4.scales, q4.zeros, 128, config=cfg)  # noqa: E731
    return {"int8 GEMM": (lambda x: qm.int8_matmul(x, q8.qweight, q8.scales, config=int8_gemm), "_int8_gemm_kernel",
                          int8_gemm),
            "int4 g128 GEMM": (int4(int4_gemm), "_int4_gemm_kernel", int4_gemm),
            "int4 g128 swap-AB": (int4(swap_ab), "_int4_small_m_kernel", swap_ab)}


def stored_bytes(kernel: str, n: int, k: int) -> int:
    """Bytes a GEMV must read of its weight (codes and scales, as labkit stores them): the floor's numerator."""
    from labkit.quant import linear_bytes

    schemes = {"fp16": None, "int8": "int8", "int4": "int4_g128"}
    head = kernel.split()[0]
    if head in schemes:
        return linear_bytes(n, k, schemes[head])  # fp16 scales, uint8 zero points
    return n * k // 4 + 4 * n  # ternary: four 2-bit codes a byte, an fp32 scale a row


def _copies(n: int, k: int) -> int:
    return max(4, min(MAX_COPIES, math.ceil(STREAM_BYTES / (n * k / 4))))  # ternary's 2 bits a weight, the smallest


def stream_us(launches: list, x: torch.Tensor, replays: int = 20) -> float:
    """Median time of one call among len(launches) back-to-back calls in one CUDA graph (no cache clearing)."""
    from labkit.bench import record

    replay = record.graphed(lambda: [launch(x) for launch in launches])
    for _ in range(3):
        replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(launches))
    return sorted(times)[len(times) // 2]


def profile_calls(calls: list[tuple]) -> list[dict]:
    """In a profiled child: run each ``(fn, manifest entries)`` once to compile, then once more between
    cudaProfilerStart and Stop (what ncu profiles); returns the entries in launch order."""
    for fn, _ in calls:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for fn, _ in calls:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    return [entry for _, entries in calls for entry in entries]


def _child(manifest_path: str, shapes=SHAPES, m: int = 1) -> None:
    """The profiled process: every kernel once per shape, in a known order (the manifest)."""
    import labkit  # noqa: F401

    manifest = []
    for n, k in shapes:
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda").half()
        ks = kernels(n, k, m)
        manifest += profile_calls([(lambda launch=launch: launch(x), [{"kernel": name, "n": n, "k": k,
                                                                      "pattern": pattern}])
                                   for name, (launch, pattern, _) in ks.items()])
        del ks
        torch.cuda.empty_cache()
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)


def _ncu() -> str:
    found = shutil.which("ncu") or sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"))
    if not found:
        raise SystemExit("quant_profile needs Nsight Compute's ncu (not found on the PATH or under /opt/nvidia)")
    return found if isinstance(found, str) else found[-1]


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_ncu_csv(text: str) -> list[dict]:
    """ncu --csv --page raw: a header row of metric names, a row of units, then one row per profiled kernel."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise RuntimeError("no ncu CSV in the output:\n" + text[-2000:])
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    header, body = rows[0], [r for r in rows[2:] if len(r) == len(rows[0])]
    return [dict(zip(header, r)) for r in body]


def match(manifest: list[dict], rows: list[dict]) -> list[tuple[dict, dict, list[dict]]]:
    """Pair each manifest entry with its ncu row, in launch order: (entry, its kernel's row, other rows of its
    launch). A Triton entry's row is the next whose kernel name matches its pattern (rows before it, e.g. a cast,
    are its extras); a cuBLAS entry (pattern None) takes the next row, and as extras every row up to the next
    entry's match. Raises if a Triton entry finds no row: the launches were not in the order the child wrote."""
    pairs, i = [], 0
    for j, entry in enumerate(manifest):
        extras = []
        if entry["pattern"] is None:
            if i >= len(rows):
                raise RuntimeError(f"no ncu row for {entry['kernel']} {entry['n']}x{entry['k']}")
            main, i = rows[i], i + 1
            nxt = manifest[j + 1]["pattern"] if j + 1 < len(manifest) else None
            while i < len(rows) and nxt is not None and not re.search(nxt, rows[i].get("Kernel Name", "")):
                extras.append(rows[i])
                i += 1
            launch = [main, *extras]  # cuBLAS may run a split-k GEMM and its reduction: the longest is the GEMM
            main = max(launch, key=lambda r: _number(r.get(METRICS["kernel_ns"], "")) or 0.0)
            extras = [r for r in launch if r is not main]
        else:
            while i < len(rows) and not re.search(entry["pattern"], rows[i].get("Kernel Name", "")):
                extras.append(rows[i])
                i += 1
            if i >= len(rows):
                raise RuntimeError(f"no ncu row for {entry['kernel']} {entry['n']}x{entry['k']}")
            main, i = rows[i], i + 1
        pairs.append((entry, main, extras))
    return pairs


def summarise(row: dict, n: int, k: int, copy_gbps: float | None) -> dict:
    """The recorded metrics of one ncu row (missing ones are None), with the derived figures."""
    out = {name: _number(row[metric]) if metric in row else None for name, metric in METRICS.items()}
    stalls = {}
    for col, value in row.items():
        found = _STALL.match(col)
        if found and _number(value):
            stalls[found.group(1)] = _number(value)
    out["stalls"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1])[:8])
    out["dram_columns"] = {col: value for col, value in row.items() if col.startswith(("dram__", "gpu__dram"))}
    cycles = _number(row.get("sm__cycles_elapsed.avg", ""))
    if out["sm_clock_hz"] is None and cycles and out["kernel_ns"]:  # the clock from cycles over time
        out["sm_clock_hz"] = cycles / out["kernel_ns"] * 1e9
    ns = out["kernel_ns"]
    moved = (out["dram_read_bytes"] or 0) + (out["dram_write_bytes"] or 0)
    out["kernel_us"] = ns / 1e3 if ns else None
    out["dram_gbps"] = moved / ns if ns else None
    out["pct_of_copy"] = 100 * out["dram_gbps"] / copy_gbps if ns and copy_gbps else None
    if out["warp_instructions"] and out["threads_per_instruction"]:
        out["thread_instr_per_weight"] = out["warp_instructions"] * out["threads_per_instruction"] / (n * k)
    else:
        out["thread_instr_per_weight"] = None
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--no-ncu", action="store_true", help="time only (graph_us, stream_us); no counters")
    parser.add_argument("--shapes", default=None, help="NxK,... instead of Llama-3-8B's (e.g. the 1B engine's)")
    parser.add_argument("--m", type=int, default=1, help="rows of x: 1 (the GEMVs) or 2-16 (the tensor-core kernels)")


def _shapes(args) -> tuple:
    if not getattr(args, "shapes", None):
        return SHAPES
    from labkit.bench.record import parse_shapes

    return parse_shapes(args.shapes)


def run(args) -> dict:
    from labkit.bench import record

    if not torch.cuda.is_available():
        raise SystemExit("quant_profile profiles GPU kernels; on the CPU replot data/bench/quant_profile.json")
    copy_gbps = record.copy_bandwidth_gbps()
    rows = []
    shapes, m = _shapes(args), getattr(args, "m", 1)
    if not 1 <= m <= 16:
        raise ValueError(f"--m {m}: the profile covers m = 1 (GEMVs) to 16 (the small-batch tensor-core kernels)")
    for n, k in shapes:
        torch.manual_seed(0)
        x = torch.randn(m, k, device="cuda").half()
        copies = [kernels(n, k, m) for _ in range(_copies(n, k))]
        for name, (launch, _, cfg) in copies[0].items():
            launch(x)
            graph = record.time_ms(record.graphed(lambda launch=launch: launch(x))) * 1e3
            stream = stream_us([c[name][0] for c in copies], x)
            nbytes = stored_bytes(name, n, k) + 2 * m * (k + n)  # and x, y in fp16
            rows.append({"kernel": name, "n": n, "k": k, "m": m, "config": cfg, "stored_bytes": nbytes,
                         "graph_us": graph, "stream_us": stream, "copies": len(copies),
                         "graph_pct_of_copy": 100 * nbytes / graph / 1e3 / copy_gbps,
                         "stream_pct_of_copy": 100 * nbytes / stream / 1e3 / copy_gbps})
            print(f"{name:22s} {n:5d}x{k:5d}  graph {graph:6.1f} us  stream {stream:6.1f} us", flush=True)
        del copies
        torch.cuda.empty_cache()
    if not getattr(args, "no_ncu", False):
        _profile(rows, copy_gbps, shapes, m)
    return {"shapes": {"nk": [list(s) for s in shapes], "m": m, "x": "fp16"}, "copy_gbps": copy_gbps,
            "sections": list(SECTIONS), "rows": rows}


def run_under_ncu(module: str, child_args: list[str]) -> tuple[list[dict], list[dict]]:
    """Run ``python -m module --child MANIFEST *child_args`` under ncu (SECTIONS, EXTRA_METRICS if it takes them):
    (the manifest the child wrote, in launch order; ncu's rows, one per profiled kernel). The child profiles what
    it launches between torch.cuda.profiler.start() and stop()."""
    import tempfile

    manifest_path = tempfile.mktemp(suffix=".json")
    base = [_ncu(), "--clock-control", "none", "--profile-from-start", "off", "--target-processes", "all", "--csv",
            "--page", "raw", "--print-units", "base"]
    for section in SECTIONS:
        base += ["--section", section]
    child = [sys.executable, "-m", module, "--child", manifest_path, *child_args]
    for extra in (["--metrics", ",".join(EXTRA_METRICS)], []):  # without the named metrics if ncu refuses them
        print("running ncu", " ".join(extra), flush=True)
        done = subprocess.run(base + extra + child, capture_output=True, text=True, timeout=400,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode == 0 and os.path.exists(manifest_path):
            break
        print(f"ncu failed (rc {done.returncode}): {(done.stdout + done.stderr)[-1500:]}", flush=True)
    else:
        raise RuntimeError("ncu failed with and without the named metrics (output above)")
    with open(manifest_path) as f:
        return json.load(f), parse_ncu_csv(done.stdout)


def _profile(rows: list[dict], copy_gbps: float, shapes, m: int = 1) -> None:
    manifest, ncu_rows = run_under_ncu("labkit.bench.quant_profile", [",".join(f"{n}x{k}" for n, k in shapes), str(m)])
    by_key = {(r["kernel"], r["n"], r["k"]): r for r in rows}
    for entry, main, extras in match(manifest, ncu_rows):
        row = by_key[(entry["kernel"], entry["n"], entry["k"])]
        row["ncu"] = summarise(main, entry["n"], entry["k"], copy_gbps)
        row["ncu"]["stored_pct_of_copy"] = (100 * row["stored_bytes"] / row["ncu"]["kernel_ns"] / copy_gbps
                                            if row["ncu"]["kernel_ns"] else None)
        row["ncu_kernels"] = [r.get("Kernel Name", "")[:80] for r in [main, *extras]]
        p = row["ncu"]
        print(f"{entry['kernel']:22s} {entry['n']:5d}x{entry['k']:5d}  kernel {p['kernel_us'] or 0:6.1f} us  "
              f"{p['pct_of_copy'] or 0:4.0f}% copy (dram), {p['stored_pct_of_copy'] or 0:4.0f}% (stored bytes)  "
              f"occ {p['occupancy_achieved_pct'] or 0:4.0f}/"
              f"{p['occupancy_theoretical_pct'] or 0:.0f}%  issue {p['issue_active_pct'] or 0:4.0f}%  "
              f"{p['thread_instr_per_weight'] or 0:.2f} instr/weight  stalls {list(p['stalls'].items())[:3]}",
              flush=True)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--child":
    from labkit.bench.record import parse_shapes

    _child(sys.argv[2], parse_shapes(sys.argv[3]), int(sys.argv[4]))
