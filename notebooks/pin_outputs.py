"""Store the reference outputs of the cells tagged ``nbval-check-output``; clear every other output.

nbval compares a tagged cell's new output with the output stored in the notebook, so a tagged cell with nothing
stored checks nothing. Notebooks are committed without outputs except these few pinned, deterministic ones. The
marker is a cell *tag* (JupyterLab: the gear icon on the right, "Common Tools", "Cell Tag"; nbval reads it from
the cell's metadata), not a ``# NBVAL_CHECK_OUTPUT`` comment, so that learners do not see test machinery in the
code. After changing a pinned cell, run from the repository root:

    .venv/bin/python notebooks/pin_outputs.py notebooks/NN_name.ipynb [...]

To turn old ``# NBVAL_CHECK_OUTPUT`` / ``# NBVAL_IGNORE_OUTPUT`` / ``# NBVAL_SKIP`` comments into tags, without
executing anything and keeping every stored output:

    .venv/bin/python notebooks/pin_outputs.py --tags notebooks/*.ipynb
"""
import os
import sys

import nbformat

TAG = "nbval-check-output"
# nbval's comment markers and the tags that mean the same (nbval.plugin.metadata_tags)
COMMENT_TAGS = {"NBVAL_CHECK_OUTPUT": "nbval-check-output", "NBVAL_IGNORE_OUTPUT": "nbval-ignore-output",
                "NBVAL_SKIP": "nbval-skip", "NBVAL_RAISES_EXCEPTION": "nbval-raises-exception"}


def comments_to_tags(nb) -> int:
    """Move every nbval comment marker of ``nb``'s code cells into the cell's tags; returns how many moved."""
    moved = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for line in cell.source.splitlines():
            marker = line.strip().lstrip("#").strip()
            if line.strip().startswith("#") and marker in COMMENT_TAGS:
                tags = cell.metadata.setdefault("tags", [])
                if COMMENT_TAGS[marker] not in tags:
                    tags.append(COMMENT_TAGS[marker])
                moved += 1
            else:
                kept.append(line)
        cell.source = "\n".join(kept)
    return moved


def is_pinned(cell) -> bool:
    return TAG in cell.metadata.get("tags", [])


def pin(path: str) -> int:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    if comments_to_tags(nb):
        print(f"{path}: moved # NBVAL_... comments into cell tags")
    os.environ["LABKIT_SOLUTIONS"] = "1"  # as `make test` runs them
    os.environ.setdefault("PLOTLY_RENDERER", "plotly_mimetype")  # pinned cells hold text only; no plotly.js blob
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}).execute()
    pinned = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        if is_pinned(cell):  # nbval treats a cell with outputs but no execution count as never run
            pinned += 1
        else:
            cell.execution_count = None
            cell.outputs = []
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    return pinned


def convert(path: str) -> int:
    nb = nbformat.read(path, as_version=4)
    moved = comments_to_tags(nb)
    if moved:
        nbformat.write(nb, path)
    return moved


if __name__ == "__main__":
    args = sys.argv[1:] or sys.exit(__doc__)
    if args[0] == "--tags":
        for p in args[1:] or sys.exit(__doc__):
            print(f"{p}: {convert(p)} marker comment(s) moved into tags")
    else:
        for p in args:
            print(f"{p}: pinned {pin(p)} cell(s)")
