"""What a learner sees in the notebooks: no test machinery in the cells, pinned cells marked by tags (and holding
the output they pin), every notebook limiting its threads first. Also the marker-to-tag converter. < 1 s."""
import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The notebooks converted so far; the others still carry comment markers until `pin_outputs.py --tags` runs on them.
CONVERTED = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
JARGON = ("NBVAL", "nbval", "in CI", "CI there is", "pytest")


def _pin_outputs():
    spec = importlib.util.spec_from_file_location("pin_outputs", ROOT / "notebooks" / "pin_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", CONVERTED)
def test_no_test_jargon_and_pins_are_tags(name):
    nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
    first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert "labkit.setup_notebook()" in "".join(first_code["source"]), "the first cell must limit threads"
    for i, cell in enumerate(nb["cells"]):
        source = "".join(cell["source"])
        for word in JARGON:
            assert word not in source, f"{name} cell {i} shows test jargon {word!r} to learners"
        if cell["cell_type"] == "code":
            pinned = "nbval-check-output" in cell["metadata"].get("tags", [])
            assert bool(cell.get("outputs")) == pinned, (
                f"{name} cell {i}: {'a pinned cell must store its output' if pinned else 'unpinned output committed'}"
                " (run notebooks/pin_outputs.py on it)")


def test_comment_markers_become_tags():
    pin_outputs = _pin_outputs()
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(1)"),
        nbformat.v4.new_code_cell("x = 1  # NBVAL_SKIP is not a marker when it trails code"),
        nbformat.v4.new_code_cell("#  NBVAL_IGNORE_OUTPUT\nprint(2)"),
        nbformat.v4.new_markdown_cell("# NBVAL_CHECK_OUTPUT in prose stays"),
    ])
    assert pin_outputs.comments_to_tags(nb) == 2
    assert nb.cells[0].source == "print(1)" and nb.cells[0].metadata["tags"] == ["nbval-check-output"]
    assert "tags" not in nb.cells[1].metadata
    assert nb.cells[2].metadata["tags"] == ["nbval-ignore-output"]
    assert nb.cells[3].source.startswith("# NBVAL")
    assert pin_outputs.comments_to_tags(nb) == 0  # idempotent


def test_nbval_reads_the_tag():
    from nbval.plugin import find_metadata_tags

    assert dict(find_metadata_tags({"tags": ["nbval-check-output"]})) == {"check": True}


def test_limit_threads_honours_labkit_threads(monkeypatch):
    import torch

    import labkit

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LABKIT_THREADS", "1")
        assert labkit.limit_threads() == 1 == torch.get_num_threads()
        assert "1 CPU thread " in labkit.describe()
        monkeypatch.delenv("LABKIT_THREADS")
        assert labkit.limit_threads() == min(2, __import__("os").cpu_count())
        monkeypatch.setenv("LABKIT_THREADS", "many")
        with pytest.raises(ValueError, match="LABKIT_THREADS='many'"):
            labkit.limit_threads()
        with labkit.device.threads(1):
            assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_figures_setup_is_a_no_op_outside_a_kernel():
    from labkit.notebook import setup_figures

    assert setup_figures() is None
