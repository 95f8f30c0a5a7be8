"""The figures and sentences of notebooks 05, 08 and 10 on the real GPU recordings (data/bench/) and on recordings
missing an implementation. Every number in a sentence is checked against one computed here from the rows. < 5 s."""
from __future__ import annotations

import copy
import json
import re

import pytest

from labkit import engine_quant_figures, paged_attention_figures, quant_figures
from labkit.bench import BENCH_DIR, load

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def words():
    return load("quant_matmul_words")


def _time(result, impl, m, n, k):
    return next(r["median_ms"] for r in result["rows"] if (r["impl"], r["m"], r["n"], r["k"]) == (impl, m, n, k))


def _without(result, impl, key="impl"):
    out = copy.deepcopy(result)
    out["rows"] = [r for r in out["rows"] if r[key] != impl]
    return out


def test_versions_figure_draws_every_recorded_version_and_the_byte_ideal(words):
    fig = quant_figures.versions_figure(words, "test")
    bars = [t for t in fig.data if t.type == "bar"]
    drawn = {t.name for t in bars}
    assert drawn == {i for _, _, impls in quant_figures.COMPARISONS for i in impls}
    wanted = _time(words, "fp16_cublas", 1, 4096, 4096) / _time(words, "labkit_ternary_words", 1, 4096, 4096)
    tern = next(t for t in bars if t.name == "labkit_ternary_words")
    assert tern.y[list(tern.x).index("4096x4096")] == pytest.approx(wanted)
    ideals = [t for t in fig.data if t.type == "scatter"]
    assert len(ideals) == len(quant_figures.COMPARISONS)
    fp16 = next(r for r in words["rows"] if r["impl"] == "fp16_cublas" and r["m"] == 1)
    int8 = next(r for r in words["rows"] if r["impl"] == "labkit_int8" and (r["m"], r["n"], r["k"]) ==
                (1, fp16["n"], fp16["k"]))
    assert ideals[0].y[0] == pytest.approx(fp16["weight_bytes"] / int8["weight_bytes"])


def test_version_sentences_read_the_recording(words):
    sentences = quant_figures.version_sentences(words)
    assert len(sentences) == len(quant_figures.COMPARISONS)
    times = [(_time(words, "fp16_cublas", 1, n, k) / _time(words, "labkit_int8_words", 1, n, k))
             for n, k in {(r["n"], r["k"]) for r in words["rows"]}]
    span = f"labkit_int8_words {min(times):.2f}-{max(times):.2f}x"
    assert span in sentences[0], sentences[0]
    targets = quant_figures.target_sentences(words)
    assert len(targets) == len(quant_figures.TARGETS)
    assert all(re.search(r"met on \d of 3 shapes", t) for t in targets)


def test_a_recording_missing_an_impl_leaves_it_out(words):
    partial = _without(_without(words, "labkit_ternary_words"), "labkit_ternary")
    fig = quant_figures.versions_figure(partial, "test")
    assert "labkit_ternary_words" not in {t.name for t in fig.data}
    assert len(quant_figures.version_sentences(partial)) == len(quant_figures.COMPARISONS) - 1
    assert not any(s.startswith("ternary") for s in quant_figures.target_sentences(partial))
    pair = quant_figures.comparisons_with("labkit_ternary_words")
    with pytest.raises(ValueError, match="labkit_ternary"):
        quant_figures.versions_figure(partial, "test", pair)
    assert quant_figures.version_sentences(partial, pair) == []
    with pytest.raises(ValueError, match="no comparison"):
        quant_figures.comparisons_with("labkit_int2")


def test_engine_recordings_each_get_a_figure_and_sentences(tmp_path):
    recorded = engine_quant_figures.recordings()
    names = [name for name, _ in recorded]
    assert {"engine_quant.json", "engine_quant_fp16.json"} <= set(names)
    for name, bench in recorded:
        source = engine_quant_figures.recorded_source(bench)
        assert "--out" not in source and bench["provenance"]["device"] in source
        fig = engine_quant_figures.speed_figure(bench, source)
        assert bench["shapes"]["dense"] in fig.layout.title.text
        dense = [r for r in engine_quant_figures.decode_rows(bench) if r["scheme"] == bench["shapes"]["dense"]]
        first = min(dense, key=lambda r: r["batch"])
        step = engine_quant_figures.step_sentences(bench)[0]
        assert f"{first['step_ms'] / first['floor_ms']:.1f}x its memory floor" in step
        assert f"{first['kernels_per_step']} kernels" in step
    fp16 = dict(recorded)["engine_quant_fp16.json"]
    int4 = next(r for r in fp16["rows"] if r["scheme"] == "int4_g128" and r["batch"] == 1 and r["cuda_graphs"])
    assert f"{int4['ratio_to_dense']:.2f}x fp16" in engine_quant_figures.activation_sentences(recorded)[0]
    fused = copy.deepcopy(fp16)
    for r in fused["rows"]:
        r["fused"] = True  # what engine_quant --fused records
    assert "fused ops" in engine_quant_figures.speed_figure(fused, "test").layout.title.text
    assert engine_quant_figures.recordings(tmp_path) == []
    assert engine_quant_figures.activation_sentences([]) == []
    (tmp_path / "engine_quant_x.json").write_text(json.dumps(_without(fp16, "int4_g128", key="scheme")))
    assert engine_quant_figures.activation_sentences(engine_quant_figures.recordings(tmp_path)) == []


def test_paged_attention_v4_figure_and_sentences():
    v4 = json.loads((BENCH_DIR / "paged_attention_v4.json").read_text())
    fig = paged_attention_figures.copy_share_figure(v4, "test")
    assert {t.name for t in fig.data} == {"labkit_v3", "labkit_v4", "sdpa_dense"}
    row = next(r for r in v4["rows"] if r["impl"] == "labkit_v4" and r["batch"] == 1)
    bar = next(t for t in fig.data if t.name == "labkit_v4")
    assert bar.y[0] == pytest.approx(100 * row["gbps"] / v4["copy_gbps"])
    sentences = paged_attention_figures.split_k_sentences(v4)
    v3 = next(r for r in v4["rows"] if r["impl"] == "labkit_v3" and r["batch"] == 1)
    assert f"{row['gbps'] / v3['gbps']:.2f}x labkit_v3's" in sentences[0]
    assert sentences[-1].endswith(f"runs {v4['split_k_version']} at small batch.")
    assert len(sentences) == len(v4["shapes"]["batch_x_context"]) + 1
    no_v4 = _without(v4, "labkit_v4")
    assert "labkit_v4" not in {t.name for t in paged_attention_figures.copy_share_figure(no_v4, "test").data}
    assert len(paged_attention_figures.split_k_sentences(no_v4)) == 1


@pytest.mark.timeout(60)
def test_paged_profile_sentences_set_each_replay_against_its_kernels():
    profile = load("paged_profile")
    sentences = paged_attention_figures.profile_sentences(profile)
    rows = [r for r in profile["rows"] if r["kernels"]]
    assert len(sentences) == len(rows)
    for r, text in zip(rows, sentences):
        alone = sum(k["kernel_us"] for k in r["kernels"])
        assert text.startswith(f"{r['impl']} at {r['batch']} x {r['context']}: one replay {r['graph_us']:.1f} µs")
        assert text.endswith(f"the replay takes {r['graph_us'] - alone:.1f} µs more than they do.")
        assert all(f"{k['kernel_us']:.1f} µs at {k['pct_of_copy']:.0f}% of the copy" in text for k in r["kernels"])
    v3 = next(r for r in rows if r["impl"] == "labkit_v3")
    assert [k["name"] for k in v3["kernels"]] == ["_paged_attention_v3_split_kernel",
                                                  "_paged_attention_v3_reduce_kernel"]
    empty = {**profile, "rows": [{**r, "kernels": []} for r in profile["rows"]]}  # a run without ncu rows
    assert paged_attention_figures.profile_sentences(empty) == []
