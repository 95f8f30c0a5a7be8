"""Timing and provenance shared by every benchmark; one JSON file per benchmark in data/bench/."""
from __future__ import annotations

import datetime as _dt
import json
import pathlib
import platform
import shlex
import sys
import time
import traceback

import torch

BENCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "data" / "bench"


def provenance(command: str | None = None) -> dict:
    """Who measured what, where: GPU name, library versions, date and the exact command."""
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    props = torch.cuda.get_device_properties(0) if gpu else None
    return {
        "device": gpu or "cpu",
        "sm_count": props.multi_processor_count if props else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
    }


def cpu_name() -> str:
    """The CPU's model name (for benchmarks recorded on the CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_ms(fn, *, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of ``fn()`` in milliseconds, measured with CUDA events by triton's do_bench.

    do_bench clears the L2 cache before every call, outside the timed region (so small inputs are not
    flattered by it), and reports the median over as many calls as fit in ``rep_ms``.
    """
    import triton.testing

    if not torch.cuda.is_available():
        raise RuntimeError("time_ms measures GPU kernels; on the CPU replot the recorded figures instead.")
    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graphed(fn):
    """Capture ``fn()`` in a CUDA graph and return its replay, as serving engines replay decode steps: a
    timing of the replay excludes Python's launch overhead. Warms up on a side stream first, as torch's
    docs ask."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth_gbps(num_bytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written per second, in GB/s): the ceiling
    that memory-bound kernels are judged against."""
    src = torch.empty(num_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    del src, dst
    return num_bytes / (ms * 1e-3) / 1e9


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """``"4096x4096,14336x4096"`` -> ((4096, 4096), (14336, 4096)): the ``--shapes`` option of the benchmarks."""
    return tuple(tuple(int(v) for v in part.lower().split("x")) for part in text.split(","))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over ref's rows (inf if out has a NaN or inf)."""
    out = out[: ref.shape[0]].float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def measure(name, fn, ref, nbytes, rep_ms, **extra) -> dict:
    """Check fn() against the reference (if given), then time its CUDA-graph replay (median_ms) and eager calls (eager_ms)."""
    row = dict(impl=name, **extra)
    try:
        t0 = time.perf_counter()
        out = fn()  # compiles on the first call
        torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - t0, 2)
        if ref is not None:
            row["rel_err"] = rel_err(out, ref)
        eager_ms = time_ms(fn, rep_ms=max(20, rep_ms // 2))
        try:
            held = {}
            replay = graphed(lambda: held.__setitem__("out", fn()))
            if isinstance(out, torch.Tensor):  # poison: the replay must write every element again
                held["out"].fill_(float("nan"))
                replay()
                torch.cuda.synchronize()
                if not torch.equal(held["out"], out):
                    row["graph_rel_diff"] = rel_err(held["out"], out.float())
            ms, row["timing"] = time_ms(replay, rep_ms=rep_ms), "cuda_graph"
        except Exception as exc:  # said in the row: this impl's median_ms is an eager time
            row["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
            ms, row["timing"] = eager_ms, "eager"
        row.update(median_ms=ms, gbps=nbytes / (ms * 1e-3) / 1e9, eager_ms=eager_ms)
    except Exception as exc:  # recorded, not hidden: the row says why this impl has no time
        row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        traceback.print_exc()
    return row


def save(name: str, result: dict, command: str | None = None) -> pathlib.Path:
    """Write ``data/bench/NAME.json``: provenance first, then the benchmark's own fields."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"{name}.json"
    payload = {"name": name, "provenance": provenance(command), **result}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def load(name: str) -> dict:
    """Read a recorded benchmark; a clear error if it was never recorded."""
    path = BENCH_DIR / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: record it on a GPU machine with `python -m labkit.bench {name}`."
        )
    return json.loads(path.read_text())
