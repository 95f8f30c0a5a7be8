"""Give notebook cells reveal.js slide metadata by rule, so ``make slides`` turns each notebook into a deck.

    python -m labkit.workshop.slides notebooks/02_kv_cache.ipynb     # tag in place (idempotent)
    python -m labkit.workshop.slides --check notebooks/*.ipynb       # exit 1 if any cell would change

The rules, in order (the first that applies sets ``cell.metadata.slideshow.slide_type``):

| cell | slide type | why |
|---|---|---|
| has a tag ``slide``, ``subslide``, ``fragment``, ``skip`` or ``notes`` | that tag | an author's override |
| markdown starting with ``Notes:`` | ``notes`` | presenter notes: the speaker view shows them, the deck does not |
| markdown with a ``# `` or ``## `` heading line | ``slide`` | the title (with the learning objectives) and each section |
| markdown with a ``### `` heading line | ``subslide`` | a step inside a section, one slide down |
| code before the first section (``## ``) heading | ``skip`` | setup (imports, loading the model) |
| code under the ``Exercises`` heading, or with ``# YOUR CODE`` / ``check(`` | ``skip`` | exercises are for the lab, not the talk |
| other markdown under the ``Exercises`` heading | ``fragment`` | the tasks appear one at a time |
| code that draws a figure (``.show()``, ``display(``, ``go.Figure``) | ``subslide`` | a figure gets a slide of its own |
| anything else | ``-`` | stays on the current slide |

Only ``metadata.slideshow`` is written and the file keeps nbformat's layout, so running it twice changes nothing
and the diff of a first run shows only slide types.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TAGS = ("slide", "subslide", "fragment", "skip", "notes")
_FIGURE = re.compile(r"\.show\(\)|(^|\W)display\(|go\.Figure\(")


def _headings(source: str) -> list[int]:
    """The level of each markdown heading line in ``source`` (1 for '# ', 2 for '## ', ...)."""
    return [len(m.group(1)) for m in re.finditer(r"^(#{1,6}) \S", source, flags=re.MULTILINE)]


def slide_type(cell, in_exercises: bool = False, in_setup: bool = False) -> str:
    """The slide type the rules above give ``cell``.

    ``in_exercises``: it comes after an Exercises heading; ``in_setup``: before the first section heading.
    """
    for tag in cell.get("metadata", {}).get("tags", []):
        if tag in TAGS:
            return tag
    source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    if cell["cell_type"] == "markdown":
        if source.lstrip().startswith(("Notes:", "**Notes:**", "**Notes**:")):
            return "notes"
        levels = _headings(source)
        if any(level <= 2 for level in levels):
            return "slide"
        if 3 in levels:
            return "subslide"
        return "fragment" if in_exercises else "-"
    if cell["cell_type"] == "code":
        if in_setup or in_exercises or "# YOUR CODE" in source or re.search(r"(^|\W)check\(", source):
            return "skip"
        if _FIGURE.search(source):
            return "subslide"
    return "-"


def _starts_exercises(cell) -> bool | None:
    """True for a section heading 'Exercises', False for any other section heading, None if no heading."""
    if cell["cell_type"] != "markdown":
        return None
    source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    m = re.search(r"^#{1,2} (.*)$", source, flags=re.MULTILINE)
    return None if m is None else m.group(1).strip().lower().startswith("exercise")


def tag(nb) -> int:
    """Set every cell's slide type by the rules; return how many cells changed."""
    changed = 0
    in_exercises, in_setup = False, True
    for cell in nb.cells:
        starts = _starts_exercises(cell)
        if starts is not None:
            in_exercises = starts
        if cell["cell_type"] == "markdown" and 2 in _headings("".join(cell["source"])):
            in_setup = False
        kind = slide_type(cell, in_exercises=in_exercises and starts is None, in_setup=in_setup)
        slideshow = cell.metadata.get("slideshow", {})
        if slideshow.get("slide_type") != kind:
            cell.metadata["slideshow"] = {**slideshow, "slide_type": kind}
            changed += 1
    return changed


def main(argv: list[str] | None = None) -> int:
    import nbformat

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="+", type=Path)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook is not tagged")
    args = ap.parse_args(argv)
    stale = []
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        changed = tag(nb)
        if changed and not args.check:
            nbformat.write(nb, path)
        if changed:
            stale.append(path)
        print(f"{path}: {changed} cell(s) {'would change' if args.check else 'changed'}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
