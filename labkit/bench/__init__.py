"""Recorded GPU figures. ``python -m labkit.bench NAME`` runs the benchmark module ``labkit.bench.NAME``
(its ``run(args) -> dict`` function) on the GPU and writes ``data/bench/NAME.json`` with provenance.

Notebooks call :func:`load` to replot what was recorded when no GPU is present, and :func:`run_live`
to measure again when one is.
"""
from labkit.bench.record import BENCH_DIR, copy_bandwidth_gbps, graphed, load, provenance, save, time_ms

__all__ = ["BENCH_DIR", "copy_bandwidth_gbps", "graphed", "load", "provenance", "save", "time_ms"]
