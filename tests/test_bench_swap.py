"""The swap benchmark runs at tiny shapes on the CPU (its GPU run records data/bench/swap.json)."""
import argparse

import pytest

import labkit  # noqa: F401
from labkit.bench import swap


@pytest.mark.timeout(60)
def test_swap_benchmark_tiny_runs_and_reports_both_directions():
    out = swap.run(argparse.Namespace(repeats=2, tiny=True))
    assert {r["impl"] for r in out["rows"]} == {"swap_out", "swap_in"}
    assert all(r["bytes"] == r["blocks"] * out["shapes"]["bytes_per_block"] and r["median_ms"] > 0 for r in out["rows"])
    assert swap.swap_bytes_per_s(out, blocks=4) > 0
    with pytest.raises(ValueError, match="re-record"):
        swap.swap_bytes_per_s(out, blocks=64)
