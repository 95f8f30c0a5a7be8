"""Notebooks 08 and 10's GEMV profile (ncu counters, SASS, graph and stream timings) and the engine step's GPU time
by kernel kind, on the real recordings (data/bench/) and on rows without ncu or gpu_time. Every number a sentence
quotes is computed here again from the JSON. < 5 s."""
from __future__ import annotations

import copy

import pytest

from labkit import engine_quant_figures, quant_profile_figures as qp
from labkit.bench import load

pytestmark = pytest.mark.timeout(60)
SHAPE = (4096, 14336)


@pytest.fixture(scope="module")
def profile():
    return load("quant_profile")


@pytest.fixture(scope="module")
def sass():
    return load("quant_sass")


def _rows(recording, kernel):
    return [r for r in recording["rows"] if r["kernel"] == kernel]


def _range(values, fmt):
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}-{hi}"


def test_recordings_are_found():
    assert {"quant_profile.json", "quant_profile_1b.json"} <= {name for name, _ in qp.recordings()}


def test_profile_figure_marks_each_kernel_at_its_counters(profile):
    fig = qp.profile_figure(profile, SHAPE)
    markers = {t.name: t for t in fig.data if t.type == "scatter" and t.mode == "markers+text"}
    kernels = {r["kernel"] for r in profile["rows"]}
    assert set(markers) == kernels
    words = next(r for r in _rows(profile, "int4 g128 WORDS") if (r["n"], r["k"]) == SHAPE)
    assert markers["int4 g128 WORDS"].x[0] == pytest.approx(words["ncu"]["thread_instr_per_weight"])
    assert markers["int4 g128 WORDS"].y[0] == pytest.approx(words["ncu"]["pct_of_copy"])
    assert "occupancy" in markers["int4 g128 WORDS"].hovertext[0]
    clocked = any(r["ncu"].get("sm_clock_hz") for r in profile["rows"])
    assert any("issue limit" in (t.name or "") for t in fig.data) == clocked
    with pytest.raises(ValueError, match="no kernel with ncu"):
        qp.profile_figure(profile, (1, 1))


def test_the_issue_limit_comes_from_copy_bandwidth_sms_and_clock(profile):
    clocked = copy.deepcopy(profile)
    for r in clocked["rows"]:
        r["ncu"]["sm_clock_hz"] = 1.5e9
    row = next(r for r in _rows(clocked, "ternary words") if (r["n"], r["k"]) == SHAPE)
    per_sm_clock = clocked["copy_gbps"] * 1e9 / (clocked["provenance"]["sm_count"] * 1.5e9)
    wanted = 128 / (per_sm_clock * row["n"] * row["k"] / row["stored_bytes"])
    assert qp.affordable_instructions(clocked, row, 1.5e9) == pytest.approx(wanted)
    limits = [t for t in qp.profile_figure(clocked, SHAPE).data if (t.name or "").endswith("issue limit")]
    assert {t.name for t in limits} == {"fp16 issue limit", "int8 issue limit", "int4_g128 issue limit",
                                        "ternary issue limit"}
    first = qp.profile_sentences(clocked)[0]
    assert first.startswith("At the SM clock ncu read (1.50 GHz)") and f"{per_sm_clock:.1f} bytes a clock" in first


def test_profile_sentences_quote_the_counters(profile):
    sentences = qp.profile_sentences(profile)
    assert len(sentences) == len({r["kernel"] for r in profile["rows"]}) + any(
        r["ncu"].get("sm_clock_hz") for r in profile["rows"])
    words = [r["ncu"] for r in _rows(profile, "int4 g128 WORDS")]
    text = next(s for s in sentences if s.startswith("int4 g128 WORDS"))
    assert f"{_range([c['thread_instr_per_weight'] for c in words], '.1f')} thread instructions a weight" in text
    assert f"DRAM at {_range([c['pct_of_copy'] for c in words], '.0f')}% of the copy" in text
    assert f"issuing {_range([c['issue_active_pct'] for c in words], '.0f')}% of cycles" in text
    int8 = [r["ncu"] for r in _rows(profile, "int8 WORDS")]
    text = next(s for s in sentences if s.startswith("int8 WORDS"))
    assert f"long_scoreboard ({_range([c['stalls']['long_scoreboard'] for c in int8], '.1f')} cycles" in text
    only = qp.profile_sentences(profile, kernels=("ternary words",))
    clock = any(r["ncu"].get("sm_clock_hz") for r in profile["rows"])  # then the issue budget comes first
    assert len(only) == 1 + clock and only[-1].startswith("ternary words")


def test_rows_without_ncu_are_skipped(profile):
    partial = copy.deepcopy(profile)
    for r in partial["rows"]:
        if r["kernel"] == "ternary v1":
            r["ncu"] = None
        if r["kernel"] == "int8 WORDS":
            del r["ncu"]
    assert "ternary v1" not in {t.name for t in qp.profile_figure(partial, SHAPE).data}
    assert not any(s.startswith(("ternary v1", "int8 WORDS")) for s in qp.profile_sentences(partial))
    qp.timing_figure(partial)  # timings stay; the kernel-alone bar just lacks those kernels
    assert any(s.startswith("ternary v1") for s in qp.timing_sentences(partial))


def test_timing_figure_and_sentences_divide_cublas_by_each_kernel(profile):
    fig = qp.timing_figure(profile)
    by = {(r["kernel"], r["n"], r["k"]): r for r in profile["rows"]}
    stream = next(t for t in fig.data if t.name == "in a stream (stream_us)")  # the first panel: 4096x4096
    i = list(stream.x).index("ternary words")
    n, k = profile["shapes"]["nk"][0]
    wanted = by[("fp16 cuBLAS", n, k)]["stream_us"] / by[("ternary words", n, k)]["stream_us"]
    assert stream.y[i] == pytest.approx(wanted)
    sentences = qp.timing_sentences(profile)
    lone = [by[("fp16 cuBLAS", n, k)]["graph_us"] / by[("int4 g128 WORDS", n, k)]["graph_us"]
            for n, k in profile["shapes"]["nk"]]
    text = next(s for s in sentences if s.startswith("int4 g128 WORDS"))
    assert f"{_range(lone, '.2f')}x fp16 cuBLAS as a lone replay" in text
    gaps = [r["graph_us"] - r["ncu"]["kernel_us"] for r in profile["rows"]]
    assert f"{_range(gaps, '.1f')} µs longer than the kernel alone" in sentences[-2]
    lm_head = dict(qp.recordings())["quant_profile_1b.json"]
    assert len(qp.timing_figure(lm_head).layout.annotations) == len(lm_head["shapes"]["nk"])  # one panel a shape


def test_sass_mix_adds_up_to_the_loop_count(sass, profile):
    fig = qp.sass_figure(sass, profile)
    bars = [t for t in fig.data if t.type == "bar"]
    for i, row in enumerate(sass["rows"]):
        assert sum(t.y[i] for t in bars) == pytest.approx(row["instructions_per_weight"])
    ncu = next(t for t in fig.data if t.type == "scatter")
    counted = {r["kernel"]: r["ncu"]["thread_instr_per_weight"] for r in profile["rows"] if (r["n"], r["k"]) == SHAPE}
    assert list(ncu.y) == pytest.approx([counted[r["kernel"]] for r in sass["rows"]])
    sentences = qp.sass_sentences(sass, profile)
    tern = next(r for r in sass["rows"] if r["kernel"] == "ternary words")
    text = next(s for s in sentences if s.startswith("ternary words"))
    assert f"{tern['loop_instructions']} instructions" in text
    assert f"{tern['instructions_per_weight']:.2f} a weight" in text
    assert f"ncu counts {counted['ternary words']:.2f}" in text
    assert len(qp.sass_sentences(sass, kernels=("ternary v1", "ternary words"))) == 2


def test_step_breakdown_stacks_to_the_step_and_skips_older_recordings():
    recorded = dict(engine_quant_figures.recordings())
    bench = recorded["engine_quant_fused_fp16.json"]
    fig = engine_quant_figures.step_breakdown_figure(bench, "test")
    rows = sorted(engine_quant_figures.decode_rows(bench), key=lambda r: r["batch"])
    totals = [sum(t.y[i] for t in fig.data) for i in range(len(rows))]
    assert totals == pytest.approx([r["step_ms"] for r in rows])
    assert fig.data[-1].name == engine_quant_figures.IDLE
    sentences = engine_quant_figures.breakdown_sentences(bench)
    base = next(r for r in rows if r["scheme"] == "fp16" and r["batch"] == 1)
    int4 = next(r for r in rows if r["scheme"] == "int4_g128" and r["batch"] == 1)
    assert f"GPU idle {base['step_ms'] - base['gpu_time']['busy_ms']:.2f} ms" in sentences[0]
    linear, dense_linear = int4["gpu_time"]["by_kind"]["linear"], base["gpu_time"]["by_kind"]["linear"]
    text = next(s for s in sentences if s.startswith("int4_g128"))
    assert f"linear kernels {linear:.2f} ms ({dense_linear / linear:.2f}x faster" in text
    assert f"the step {base['step_ms'] / int4['step_ms']:.2f}x faster" in text
    older = recorded["engine_quant.json"]  # recorded before gpu_time
    assert engine_quant_figures.breakdown_sentences(older) == []
    with pytest.raises(ValueError, match="gpu_time"):
        engine_quant_figures.step_breakdown_figure(older, "test")
    mixed = copy.deepcopy(bench)
    del mixed["rows"][0]["gpu_time"]  # fp16 at batch 1: its bar goes, and the sentences have no baseline at batch 1
    assert len(engine_quant_figures.step_breakdown_figure(mixed, "test").data[0].y) == len(rows) - 1
    assert engine_quant_figures.breakdown_sentences(mixed) == []
