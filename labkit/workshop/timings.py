"""Measure each notebook as an instructor needs it: wall time, peak memory and CPU of its kernel, quiet and loaded.

    python -m labkit.workshop.timings                 # all notebooks, quiet then loaded (about 30 min on 2 cores)
    python -m labkit.workshop.timings 00 02 --repeat 1
    python -m labkit.workshop.timings --render-only   # rewrite the guide's table from the JSON, measure nothing

Each notebook runs in a fresh kernel (nbclient, the way nbval and ``make book`` run it) with
``LABKIT_SOLUTIONS=1``, so stub exercises are checked with their worked solutions, as if the learner had
solved them. "Loaded" means ``--load`` busy-loop processes (default: one per core) spin for the whole run;
each stops itself at a deadline, so a crashed measurement leaves nothing spinning.

A sampler thread reads the kernel's resident memory (RSS, kernel plus any children) every 0.1 s; CPU is the
kernel's user + system seconds read after the last cell. The results go to ``data/workshop/timings.json``
(with the machine, load average and versions), and a table is written into ``notebooks/INSTRUCTOR.md``
between the ``timings:begin`` / ``timings:end`` markers. No number in that table is typed by hand.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
RESULTS = ROOT / "data" / "workshop" / "timings.json"
GUIDE = NOTEBOOKS / "INSTRUCTOR.md"
BEGIN, END = "<!-- timings:begin (written by python -m labkit.workshop.timings) -->", "<!-- timings:end -->"
STALL_S = 30.0  # seconds of a run outside every cell's own time beyond which the table calls it a stall
SIZING_BEGIN = "<!-- sizing:begin (written by python -m labkit.workshop.timings) -->"
SIZING_END = "<!-- sizing:end -->"


def notebook_paths(prefixes: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if prefixes:
        paths = [p for p in paths if p.name[:2] in prefixes]
        if not paths:
            raise SystemExit(f"no notebook in {NOTEBOOKS} starts with any of {prefixes}")
    return paths


def kernel_env() -> dict[str, str]:
    """The environment a measured (or book/slides) kernel runs in: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["LABKIT_SOLUTIONS"] = "1"
    return env


def wake_every_second(kc) -> None:
    """Make the kernel client's shell and iopub reads wait in slices of at most a second.

    Under load, runs were seen where the kernel had replied and gone idle while the client went on waiting until
    its per-cell timeout (240 s here, 600 s in make book) and then carried on without an error, as if its event
    loop had not been woken for a message that was already there. Waiting in short slices (each ends in a fresh
    poll of the socket) bounds such a wait to a second and changes nothing else: the same messages are read, in
    the same order, and the overall timeout still applies.
    """
    from queue import Empty

    for channel in (kc.shell_channel, kc.iopub_channel):
        original = channel.get_msg

        async def get_msg(timeout=None, _original=original):
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    return await _original(timeout=1.0 if remaining is None else min(1.0, remaining))
                except Empty:
                    if remaining is not None and remaining <= 1.0:
                        raise

        channel.get_msg = get_msg


def _spin(deadline: float) -> None:
    while time.time() < deadline:
        pass


class Load:
    """``n`` busy-loop processes for at most ``max_seconds``; a context manager that stops them on exit."""

    def __init__(self, n: int, max_seconds: float):
        self.n, self.max_seconds, self.procs = n, max_seconds, []

    def __enter__(self) -> "Load":
        deadline = time.time() + self.max_seconds
        ctx = multiprocessing.get_context("spawn")
        self.procs = [ctx.Process(target=_spin, args=(deadline,), daemon=True) for _ in range(self.n)]
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join(timeout=10)


class KernelSampler(threading.Thread):
    """Polls one process tree's RSS; ``cpu_seconds`` is refreshed from outside after each cell."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.interval, self.peak_rss, self.cpu_seconds = interval, 0, 0.0
        self._stop_event = threading.Event()

    def rss(self) -> int:
        import psutil

        total = 0
        try:
            procs = [self.proc] + self.proc.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def read_cpu(self) -> None:
        import psutil

        try:
            t = self.proc.cpu_times()
        except psutil.NoSuchProcess:
            return
        self.cpu_seconds = t.user + t.system + t.children_user + t.children_system

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_rss = max(self.peak_rss, self.rss())
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _cell_seconds(cell) -> float | None:
    ex = cell.get("metadata", {}).get("execution", {})
    start, end = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
    if not (start and end):
        return None
    parse = datetime.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


class Stalled(RuntimeError):
    """A cell ran past the timeout (or the kernel died): the run is recorded as stalled at ``cell``."""

    def __init__(self, cell: int | None, message: str):
        super().__init__(message)
        self.cell = cell


def _machine_busy_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def run_notebook(path: Path, timeout: int = 240):
    """Execute ``path`` in a fresh kernel in its own folder; return (executed notebook, measurements)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=True,
                            resources={"metadata": {"path": str(path.parent)}})
    state: dict = {}

    # Client-side clock at each phase: a stall shows as client time that no cell's own (kernel-side) time explains.
    clock: dict = {"cells": {}}

    def on_start(notebook):
        wake_every_second(client.kc)
        clock["kernel_ready"] = time.perf_counter()
        state["sampler"] = KernelSampler(client.km.provisioner.process.pid)
        state["sampler"].start()

    def on_cell_start(cell, cell_index):
        state["cell"] = cell_index
        clock["cells"][cell_index] = [time.perf_counter(), None]

    def on_cell(cell, cell_index, execute_reply):
        clock["cells"][cell_index][1] = time.perf_counter()
        state["sampler"].read_cpu()

    client.on_notebook_start = on_start
    client.on_cell_start = on_cell_start
    client.on_cell_executed = on_cell
    busy0 = _machine_busy_seconds()
    t0 = time.perf_counter()
    try:
        client.execute(env=kernel_env())
    except (CellTimeoutError, DeadKernelError) as e:
        raise Stalled(state.get("cell"), f"{type(e).__name__} at cell {state.get('cell')}") from e
    finally:
        if "sampler" in state:
            state["sampler"].stop()
    wall = time.perf_counter() - t0
    busy = _machine_busy_seconds() - busy0
    cells = [(i, _cell_seconds(c)) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    cells = [(i, s) for i, s in cells if s is not None]
    slowest = sorted(cells, key=lambda c: -c[1])[:3]
    kernel_side = dict(cells)
    waits = [(i, (end - start) - kernel_side.get(i, 0.0)) for i, (start, end) in clock["cells"].items() if end]
    worst_wait = max(waits, key=lambda w: w[1], default=(None, 0.0))
    return nb, {
        "wall_s": round(wall, 2),
        "cells_s": round(sum(s for _, s in cells), 2),
        "slowest_cells": [{"cell": i, "s": round(s, 2)} for i, s in slowest],
        "peak_rss_mb": round(state["sampler"].peak_rss / 2**20, 1),
        "kernel_start_s": round(clock.get("kernel_ready", t0) - t0, 2),
        # the cell whose client-side time most exceeds its kernel-side time, and by how much (a stalled client)
        "worst_client_wait": {"cell": worst_wait[0], "s": round(worst_wait[1], 2)},
        "cpu_s": round(state["sampler"].cpu_seconds, 2),
        # CPU seconds everything else on the machine used meanwhile: says how quiet "quiet" really was.
        "other_cpu_s": round(busy - state["sampler"].cpu_seconds, 1),
    }


def machine() -> dict:
    import psutil
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {"notebooks": {}}


def save_results(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


def _measure_once(path: Path, condition: str, n_load: int, timeout: int) -> dict:
    load_before = os.getloadavg()[0]
    if condition == "loaded":
        with Load(n_load, max_seconds=timeout * 4):
            _, m = run_notebook(path, timeout)
    else:
        _, m = run_notebook(path, timeout)
    m["loadavg_1min_before"] = round(load_before, 2)
    return m


def measure(paths: list[Path], n_load: int, repeat: int, timeout: int, resume: bool = False) -> dict:
    results = load_results()
    results["machine"] = machine()
    results["command"] = "python -m labkit.workshop.timings " + " ".join(sys.argv[1:])
    results["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results["load"] = f"{n_load} busy-loop processes (one per core by default)"
    for path in paths:
        done = results["notebooks"].get(path.stem, {})
        if resume and done.get("quiet") and done.get("loaded"):
            print(f"{path.name:40s} already measured (--resume)")
            continue
        entry = {}
        for condition in ("quiet", "loaded"):
            runs, stalls = [], []
            for _ in range(repeat):
                try:
                    m = _measure_once(path, condition, n_load, timeout)
                except Stalled as e:
                    # A stall is a finding, not a number: record it, and try once more for a time.
                    print(f"{path.name:40s} {condition:6s} STALLED ({e}); running it once more", flush=True)
                    stalls.append({"cell": e.cell, "error": str(e), "timeout_s": timeout})
                    m = _measure_once(path, condition, n_load, timeout)
                runs.append(m)
                print(f"{path.name:40s} {condition:6s} wall {m['wall_s']:6.1f} s  cpu {m['cpu_s']:6.1f} s  "
                      f"peak {m['peak_rss_mb']:7.1f} MB  other CPU meanwhile {m['other_cpu_s']:6.1f} s", flush=True)
            entry[condition] = runs
            if stalls:
                entry[condition + "_stalls"] = stalls
        results["notebooks"][path.stem] = entry
        save_results(results)  # after every notebook, so an interrupted run keeps what it measured
    return results


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def table(results: dict) -> str:
    """Markdown table of the recorded results (medians over repeats)."""
    m = results.get("machine", {})
    lines = [
        f"Last measurement {results.get('date', '?')}, on {m.get('logical_cores', '?')} logical cores, "
        f"{m.get('memory_gb', '?')} GB, torch {m.get('torch', '?')}, no GPU; loaded = {results.get('load', '?')}. "
        "Wall time includes the kernel's start; CPU is the kernel's user + system seconds; peak is the kernel's "
        "resident memory (the larger of the two runs). *Others* is the CPU that everything else on the machine "
        "used during the quiet run, in cores: a quiet run is only as quiet as the machine was.",
        "",
        "| notebook | quiet | loaded | slowdown | kernel CPU | peak memory | others (quiet) | slowest cell | stalls |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    total_q = total_l = 0.0
    for name, entry in sorted(results.get("notebooks", {}).items()):
        q, l = entry.get("quiet", []), entry.get("loaded", [])
        if not (q and l):
            continue
        wq, wl = _median([r["wall_s"] for r in q]), _median([r["wall_s"] for r in l])
        total_q, total_l = total_q + wq, total_l + wl
        cpu = _median([r["cpu_s"] for r in q])
        peak = max(r["peak_rss_mb"] for r in q + l)
        others = _median([r.get("other_cpu_s", 0.0) / r["wall_s"] for r in q])
        slow = q[0]["slowest_cells"][0] if q[0]["slowest_cells"] else None
        slow_s = f"cell {slow['cell']}: {slow['s']:.0f} s" if slow else ""
        stalls = [f"{cond}: cell {st['cell']} timed out, ran again" for cond in ("quiet", "loaded")
                  for st in entry.get(cond + "_stalls", [])]
        for cond, runs in (("quiet", q), ("loaded", l)):
            for r in runs:
                idle = r["wall_s"] - r["cells_s"] - r.get("kernel_start_s", 0.0)
                if idle > STALL_S:  # the client waited, with no cell running, far longer than a kernel start
                    stalls.append(f"{cond}: {idle:.0f} s outside any cell")
        lines.append(f"| {name} | {wq:.0f} s | {wl:.0f} s | {wl / wq:.1f}× | {cpu:.0f} s | {peak:.0f} MB "
                     f"| {others:.1f} | {slow_s} | {'; '.join(stalls) or 'none'} |")
    lines.append(f"| **all** | **{total_q / 60:.1f} min** | **{total_l / 60:.1f} min** | | | | | | |")
    return "\n".join(lines)


def sizing(results: dict, learners: int = 30, within_s: float = 60.0) -> str:
    """What one shared server needs for ``learners`` kernels, from the measured peaks and CPU seconds."""
    runs = [(name, r) for name, e in sorted(results.get("notebooks", {}).items()) for r in e.get("quiet", [])]
    if not runs:
        return "(no measurements yet)"
    heaviest_mem = max(runs, key=lambda nr: nr[1]["peak_rss_mb"])
    heaviest_cpu = max(runs, key=lambda nr: nr[1]["cpu_s"])
    per_learner_cpu = sum(_median([r["cpu_s"] for r in e["quiet"]]) for e in results["notebooks"].values()
                          if e.get("quiet"))
    mem_gb = learners * heaviest_mem[1]["peak_rss_mb"] / 1024
    cores = -(-learners * heaviest_cpu[1]["cpu_s"] // within_s)  # ceil
    return "\n".join([
        f"For {learners} learners, each with one kernel open (derived from the table above):",
        "",
        f"- **memory**: the largest kernel peaked at {heaviest_mem[1]['peak_rss_mb']:.0f} MB "
        f"({heaviest_mem[0]}), so {learners} kernels need about **{mem_gb:.0f} GB**, plus the hub and the "
        "operating system; a learner who keeps two notebooks open holds two kernels.",
        f"- **CPU**: the whole series costs one learner {per_learner_cpu / 60:.1f} CPU-minutes; the heaviest "
        f"notebook ({heaviest_cpu[0]}) {heaviest_cpu[1]['cpu_s']:.0f} CPU-seconds. If all {learners} press Run "
        f"All on it at once and should finish within {within_s:.0f} s, that takes about **{cores:.0f} cores** "
        "(with one thread per kernel; see the JupyterHub sketch).",
    ])


def _replace_between(text: str, begin: str, end: str, body: str, guide: Path) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"{guide} has no {begin!r} ... {end!r} markers to write between")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n" + body + "\n" + end + tail


def render(results: dict, guide: Path = GUIDE) -> None:
    text = _replace_between(guide.read_text(), BEGIN, END, table(results), guide)
    if SIZING_BEGIN in text:
        text = _replace_between(text, SIZING_BEGIN, SIZING_END, sizing(results), guide)
    guide.write_text(text)
    print(f"wrote the timings tables into {guide}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", help="two-digit prefixes (default: all)")
    ap.add_argument("--load", type=int, default=os.cpu_count() or 2, help="busy-loop processes for 'loaded'")
    ap.add_argument("--repeat", type=int, default=1, help="runs per notebook and condition (median reported)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per cell before a run counts as stalled")
    ap.add_argument("--resume", action="store_true", help="skip notebooks the JSON already has")
    ap.add_argument("--render-only", action="store_true", help="only rewrite the guide's table from the JSON")
    args = ap.parse_args(argv)
    if args.render_only:
        results = load_results()
    else:
        results = measure(notebook_paths(args.notebooks), args.load, args.repeat, args.timeout, args.resume)
    if GUIDE.exists():
        render(results)


if __name__ == "__main__":
    main()
