"""Fragmentation numbers, the command line, and the memory-map figures built from the engine's own accounting."""
import numpy as np
import pytest

from labkit import fragmentation as frag
from labkit.memory_map import (BlockMapExplorer, MemoryMapExplorer, block_map_figure, block_size_sweep_figure,
                               kernel_time_spread, memory_map_figure, pool_contents, recorded_kernel_times,
                               useful_over_time_figure, where_memory_went_figure)
from labkit.pool_history import CATEGORIES, replay
from labkit.traces import Request, Trace, make_trace


@pytest.fixture(scope="module")
def default_runs():
    """The command's defaults: sharegpt trace, contiguous (reserve max_len) and paged (block 16)."""
    trace, contiguous = frag.run("contiguous", "sharegpt")
    _, paged = frag.run("paged", trace)
    return trace, contiguous, paged


def test_default_contiguous_lies_in_the_vllm_papers_regime(default_runs):
    _, contiguous, _ = default_runs
    lo, hi = frag.PAPER_CONTIGUOUS_USEFUL
    assert lo <= contiguous.useful_share() <= hi
    assert contiguous.saturated.mean() > 0.5  # measured on a loaded pool, as the paper did


def test_default_paged_wastes_at_most_four_percent(default_runs):
    _, contiguous, paged = default_runs
    assert 1 - paged.useful_share() <= frag.PAPER_PAGED_MAX_WASTE
    assert paged.saturated.sum() > 100
    assert paged.running[paged.saturated].mean() > 3 * contiguous.running[contiguous.saturated].mean()
    assert paged.step_end_s[-1] < contiguous.step_end_s[-1]  # more requests at once: the trace is served sooner


@pytest.mark.parametrize("p, o, r", [(1, 1, 2), (5, 3, 16), (161, 338, 2048), (10, 90, 100)])
def test_reservation_waste_formula_matches_an_engine_run(p, o, r):
    assert frag.reservation_waste(p, o, r) == sum(r - (p + k) for k in range(o))
    trace = Trace((Request(0, 0.0, p, o, r - p),), "hand-made", float("inf"), 0, r)
    sim = replay(trace, frag.engine_config("contiguous", r, reserve="max_len"))
    assert int((sim.counts["reserved"] + sim.counts["internal"]).sum()) == frag.reservation_waste(p, o, r)
    lifetime_share = sim.counts["used"].sum() / (o * r)
    assert lifetime_share == pytest.approx((p + (o - 1) / 2) / r)


def test_reservation_waste_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        frag.reservation_waste(10, 10, 18)


def test_paged_internal_waste():
    assert [frag.paged_internal_waste(n, 16) for n in (1, 15, 16, 17, 32)] == [15, 1, 0, 15, 0]


def test_command_line_prints_the_breakdown(capsys):
    assert frag.main(["--cache", "paged", "--trace", "alpaca", "--num-requests", "60", "--rate", "400",
                      "--pool-tokens", "2048", "--max-len", "512", "--block-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "useful memory (slots holding a token):" in out
    for c in CATEGORIES:
        assert f"  {c} " in out
    assert "paged (block 8)" in out and "vLLM paper" in out
    assert frag.main(["--cache", "contiguous", "--reserve", "oracle", "--trace", "alpaca", "--num-requests", "40",
                      "--pool-tokens", "2048", "--max-len", "512"]) == 0
    assert "contiguous (oracle)" in capsys.readouterr().out


def test_block_size_sweep_waste_grows_with_block_size():
    trace = make_trace("sharegpt", 120, rate=40, seed=0, max_len=1024)
    rows = frag.block_size_sweep(trace, (4, 64, 256), pool_tokens=8192)
    held_empty = [r["reserved"] + r["internal"] for r in rows]
    assert held_empty == sorted(held_empty)
    fig = block_size_sweep_figure(rows, missing="not recorded here")
    assert "not recorded here" in fig.layout.title.text


def test_kernel_axis_starts_at_zero_so_a_small_change_looks_small():
    rows = [{"block_size": b, "used": 0.9, "reserved": 0.05, "internal": 0.0, "external": 0.0, "free": 0.05}
            for b in (1, 16, 256)]
    kernel = {"paged v2": {1: 0.261, 16: 0.257, 256: 0.2557}, "_source": "recorded on GPU X"}
    fig = block_size_sweep_figure(rows, kernel=kernel)
    assert "recorded on GPU X" in fig.layout.title.text and "2% apart" in fig.layout.title.text
    assert fig.layout.yaxis2.range[0] == 0 and fig.layout.yaxis2.range[1] >= 0.261
    assert kernel_time_spread(kernel) == pytest.approx(0.261 / 0.2557 - 1)


def test_recorded_kernel_times_says_why_when_there_are_none():
    kernel, note = recorded_kernel_times("no_such_benchmark")
    assert kernel is None and "not recorded" in note


@pytest.fixture(scope="module")
def small_runs():
    trace = make_trace("sharegpt", 80, rate=40, seed=1, max_len=512, max_new_tokens=256)
    contiguous = replay(trace, frag.engine_config("contiguous", 4096, reserve="max_new_tokens"))
    paged = replay(trace, frag.engine_config("paged", 4096, block_size=16))
    return contiguous, paged


def test_memory_map_agrees_with_the_counts(small_runs):
    for sim in small_runs:
        steps = np.arange(0, sim.num_steps, 7)
        state, owner = pool_contents(sim, steps)
        for i, t in enumerate(steps):
            assert [int((state[i] == k).sum()) for k in range(len(CATEGORIES))] == [
                int(sim.counts[c][t]) for c in CATEGORIES]
        assert ((owner >= 0) == (state <= 2)).all()  # used / reserved / internal slots have an owner
    assert small_runs[0].counts["external"].max() > 0  # the contiguous run did fragment


def test_figures_build(small_runs):
    contiguous, paged = small_runs
    for color_by in ("state", "request"):
        fig = memory_map_figure(contiguous, step=100, color_by=color_by, time_bins=50)
        assert len(fig.data) >= 2
    assert "simulated GPU time" in memory_map_figure(paged, step=50, time_bins=50).layout.title.text
    assert len(where_memory_went_figure({"c": contiguous, "p": paged}).data) == len(CATEGORIES)
    assert len(useful_over_time_figure({"c": contiguous, "p": paged}).data) == 2
    fig = block_map_figure(paged, step=int(np.argmax(paged.running)))
    assert "blocks in use" in fig.layout.title.text
    with pytest.raises(ValueError, match="paged"):
        block_map_figure(contiguous, 0)


def test_every_widget_control_changes_its_figure(small_runs):
    _, paged = small_runs
    ex = BlockMapExplorer(paged)
    ex.step.value = 5  # the observer redraws
    before = ex.figure.to_json()
    ex.step.value = int(np.argmax(paged.running))
    assert ex.figure.to_json() != before
    mm = MemoryMapExplorer("alpaca", max_lens=(256, 512), num_requests=40, rate=100, pool_tokens=2048)
    mm.update()
    assert mm.step.max == mm.simulation().num_steps - 1
    for control, value in ((mm.policy, "paged: block 16"), (mm.max_len, 512), (mm.cap, "256"),
                           (mm.color_by, "request"), (mm.step, 3)):
        before = mm.figure.to_json()
        control.value = value  # a new run where needed, drawn once
        assert mm.figure.to_json() != before, f"moving {control.description} did not change the figure"
        assert mm.step.max == mm.simulation().num_steps - 1
