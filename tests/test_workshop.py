"""The workshop tools without a browser: slide rules, static outputs, the timings table and the guide."""
import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from labkit.workshop import build, slides, timings


def _types(nb):
    return [c.metadata["slideshow"]["slide_type"] for c in nb.cells]


def _example():
    return new_notebook(cells=[
        new_markdown_cell("# 99 · Title\n\n**In this notebook you will**\n- learn a thing;\n- measure it."),
        new_code_cell("import labkit\nprint(labkit.describe())"),
        new_markdown_cell("Notes: say hello"),
        new_markdown_cell("## Build\n\ntext"),
        new_code_cell("x = 1"),
        new_markdown_cell("### A step"),
        new_code_cell("fig = go.Figure()\nfig.show()"),
        new_markdown_cell("prose"),
        new_markdown_cell("## Exercises\n\n**1.** do it"),
        new_code_cell("def f():\n    # YOUR CODE\n    raise NotImplementedError\n\ncheck('nb99.f', f)"),
        new_markdown_cell("**2.** and this"),
        new_markdown_cell("## Summary\n- done"),
        new_code_cell("print('after the exercises')"),
    ])


def test_slide_rules():
    nb = _example()
    nb.cells[4].metadata["tags"] = ["fragment"]  # an author's override wins
    assert slides.tag(nb) == len(nb.cells)
    assert _types(nb) == ["slide", "skip", "notes", "slide", "fragment", "subslide", "subslide", "-",
                          "slide", "skip", "fragment", "slide", "-"]


def test_tagging_is_idempotent_and_keeps_the_file_layout(tmp_path):
    path = tmp_path / "nb.ipynb"
    nbformat.write(_example(), path)
    assert slides.main([str(path)]) == 0
    first = path.read_text()
    assert slides.main([str(path), "--check"]) == 0
    assert slides.main([str(path)]) == 0 and path.read_text() == first


@pytest.mark.parametrize("name", ["02_kv_cache", "05_paged_attention_kernel"])
def test_the_demonstration_notebooks_are_tagged(name):
    assert slides.main([str(timings.NOTEBOOKS / f"{name}.ipynb"), "--check"]) == 0


def test_staticise_draws_plotly_and_unfolds_widgets():
    fig = {"data": [{"type": "bar", "y": [1, 2]}], "layout": {"height": 300}}
    state = {
        "box": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_pick", "IPY_MODEL_out"]}},
        "pick": {"model_name": "DropdownModel", "state": {"description": "dtype", "value": None, "index": 1,
                                                           "_options_labels": ["fp16", "bf16"]}},
        "out": {"model_name": "OutputModel", "state": {"outputs": [
            {"output_type": "display_data", "metadata": {}, "data": {build.PLOTLY: fig}}]}},
    }
    nb = new_notebook(cells=[new_code_cell("w", outputs=[
        new_output("display_data", data={"text/plain": "VBox()", build.WIDGET_VIEW: {"model_id": "box"}}),
        new_output("display_data", data={build.PLOTLY: fig})]), new_markdown_cell("Notes: hidden")])
    nb.cells[1].metadata["slideshow"] = {"slide_type": "notes"}
    nb.metadata["widgets"] = {build.WIDGET_STATE: {"state": state}}
    nb = build.staticise(nb, drop_notes=True)
    outs = nb.cells[0].outputs
    assert len(nb.cells) == 1 and "widgets" not in nb.metadata
    assert "dtype: bf16" in outs[0].data["text/html"]
    assert [list(o.data) for o in outs] == [["text/html"]] * 3
    assert all("Plotly.newPlot" in o.data["text/html"] and "300px" in o.data["text/html"] for o in outs[1:])


def test_objectives_are_read_from_the_first_cell():
    title, objectives = build._title_and_objectives(_example())
    assert title == "99 · Title" and objectives.splitlines() == ["- learn a thing;", "- measure it."]


def test_the_timings_table_comes_from_the_json(tmp_path):
    run = {"wall_s": 10.0, "cells_s": 8.0, "slowest_cells": [{"cell": 3, "s": 5.0}], "peak_rss_mb": 600.0,
           "cpu_s": 9.0, "other_cpu_s": 1.0, "loadavg_1min_before": 0.1}
    results = {"machine": {"logical_cores": 2}, "notebooks": {"00_x": {"quiet": [run], "loaded": [
        {**run, "wall_s": 25.0}], "loaded_stalls": [{"cell": 4, "error": "CellTimeoutError", "timeout_s": 240}]}}}
    text = timings.table(results)
    assert "| 00_x | 10 s | 25 s | 2.5×" in text and "cell 4" in text
    guide = tmp_path / "guide.md"
    guide.write_text(f"before\n{timings.BEGIN}\nold\n{timings.END}\nafter\n")
    timings.render(results, guide)
    assert guide.read_text() == f"before\n{timings.BEGIN}\n{text}\n{timings.END}\nafter\n"


def test_the_guide_shows_the_recorded_timings():
    """The instructor guide's table is what the measuring script wrote: no number typed by hand."""
    guide = timings.GUIDE.read_text()
    results = json.loads(timings.RESULTS.read_text())
    for begin, end, body in [(timings.BEGIN, timings.END, timings.table(results)),
                             (timings.SIZING_BEGIN, timings.SIZING_END, timings.sizing(results))]:
        recorded = guide.split(begin, 1)[1].split(end, 1)[0].strip()
        assert recorded == body.strip(), (
            "notebooks/INSTRUCTOR.md's tables differ from data/workshop/timings.json: "
            "run python -m labkit.workshop.timings --render-only")
