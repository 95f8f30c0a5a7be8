"""Store the reference outputs of the pinned cells (cell tag ``nbval-check-output``, or the older comment
``# NBVAL_CHECK_OUTPUT``); clear every other output.

nbval compares a marked cell's new output with the output stored in the notebook, so a marked cell
with nothing stored checks nothing. Notebooks are committed without outputs except these few pinned,
deterministic ones. After changing a pinned cell, run from the repository root:

    .venv/bin/python notebooks/pin_outputs.py notebooks/NN_name.ipynb [...]
"""
import os
import sys

import nbformat
from nbclient import NotebookClient

MARK = "NBVAL_CHECK_OUTPUT"
TAG = "nbval-check-output"  # nbval reads it from the cell's metadata; learners never see it


def pin(path: str) -> int:
    nb = nbformat.read(path, as_version=4)
    os.environ["LABKIT_SOLUTIONS"] = "1"  # as `make test` runs them
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}).execute()
    pinned = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        if MARK in cell.source or TAG in cell.metadata.get("tags", []):  # nbval treats a cell with outputs but no execution count as never run
            pinned += 1
        else:
            cell.execution_count = None
            cell.outputs = []
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    return pinned


if __name__ == "__main__":
    for p in sys.argv[1:] or sys.exit(__doc__):
        print(f"{p}: pinned {pin(p)} cell(s)")
