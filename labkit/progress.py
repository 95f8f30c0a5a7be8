"""Which exercises this learner has passed, and help on request: ``hint`` and ``show_solution``.

    import labkit
    labkit.progress()                        # a table: each notebook's exercises, passed or not yet
    from labkit.progress import hint, show_solution
    hint("nb02.write_and_read")          # the next hint each time you ask
    show_solution("nb02.write_and_read") # the worked solution's source (labkit/solutions/nb02.py)

``check`` records a pass here when *your* function matches the reference (not when ``LABKIT_SOLUTIONS=1``
checks the worked solution in place of a stub). Progress lives in one small JSON file on this machine:
``~/.labkit/progress.json``, or the file named by ``LABKIT_PROGRESS`` (set it to give each learner of a
shared account their own file). Delete the file to start again.
"""
from __future__ import annotations

import dataclasses
import datetime
import html
import importlib
import inspect
import json
import os
import pkgutil
import warnings
from pathlib import Path


def progress_path() -> Path:
    return Path(os.environ.get("LABKIT_PROGRESS", Path.home() / ".labkit" / "progress.json"))


def load() -> dict:
    """{"passed": {name: iso time}, "hints_seen": {name: n}, "solutions_seen": {name: iso time}}."""
    path = progress_path()
    state = json.loads(path.read_text()) if path.exists() else {}
    for key in ("passed", "hints_seen", "solutions_seen"):
        state.setdefault(key, {})
    return state


def _save(state: dict) -> None:
    path = progress_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        tmp.replace(path)  # atomic: two kernels of one learner never leave half a file
    except OSError as e:
        # Progress is a convenience; an unwritable home must not stop an exercise from being checked.
        warnings.warn(f"could not save progress to {path} ({e}); set LABKIT_PROGRESS to a writable file",
                      stacklevel=3)


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def record_pass(name: str) -> None:
    """Called by ``check`` when the learner's own function for exercise ``name`` passed."""
    state = load()
    state["passed"].setdefault(name, _now())
    _save(state)


def all_exercises() -> dict[str, list[str]]:
    """{"nb02": ["write_and_read", ...], ...} for every notebook with an exercises module."""
    import labkit.exercises as pkg

    out = {}
    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        out[mod] = list(importlib.import_module(f"labkit.exercises.{mod}").EXERCISES)
    return out


@dataclasses.dataclass
class Progress:
    """What ``labkit.progress()`` returns: shows as a table in a notebook and as text in a terminal."""

    exercises: dict[str, list[str]]
    passed: dict[str, str]
    path: Path

    @property
    def num_passed(self) -> int:
        return sum(f"{nb}.{ex}" in self.passed for nb, exs in self.exercises.items() for ex in exs)

    @property
    def num_exercises(self) -> int:
        return sum(len(exs) for exs in self.exercises.values())

    def _rows(self):
        for nb, exs in self.exercises.items():
            done = [ex for ex in exs if f"{nb}.{ex}" in self.passed]
            todo = [ex for ex in exs if f"{nb}.{ex}" not in self.passed]
            yield nb, done, todo

    def __repr__(self) -> str:
        lines = [f"{self.num_passed} of {self.num_exercises} exercises passed (stored in {self.path})"]
        for nb, done, todo in self._rows():
            marks = [f"[x] {ex}" for ex in done] + [f"[ ] {ex}" for ex in todo]
            lines.append(f"  {nb}: {len(done)}/{len(done) + len(todo)}   " + "  ".join(marks))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{nb}</td><td>{len(done)}/{len(done) + len(todo)}</td>"
            f"<td>{' '.join('&#10003;&nbsp;' + html.escape(ex) for ex in done)}</td>"
            f"<td>{' '.join(html.escape(ex) for ex in todo)}</td></tr>"
            for nb, done, todo in self._rows())
        return (f"<p>{self.num_passed} of {self.num_exercises} exercises passed "
                f"<small>(stored in <code>{html.escape(str(self.path))}</code>)</small></p>"
                f"<table><tr><th>notebook</th><th>passed</th><th>done</th><th>still to do</th></tr>{rows}</table>")


def progress() -> Progress:
    """Which exercises this learner has passed; also ``labkit.progress()``."""
    return Progress(all_exercises(), load()["passed"], progress_path())


def _exercise(name: str):
    from labkit.exercises import _lookup

    return _lookup(name)


def hint(name: str) -> str:
    """Show the next hint for exercise ``name`` (each call reveals one more, then repeats the last)."""
    ex, _ = _exercise(name)
    hints = tuple(getattr(ex, "hints", ()) or ())
    state = load()
    if not hints:
        text = (f"{name}: no hints are written for this exercise yet. The spec: {ex.spec}\n"
                f"Still stuck? show_solution({name!r}) shows the worked solution.")
    else:
        n = min(state["hints_seen"].get(name, 0), len(hints) - 1)
        more = (f" Ask again for hint {n + 2}." if n + 1 < len(hints)
                else f" That was the last one; show_solution({name!r}) shows the worked solution.")
        text = f"{name}, hint {n + 1}/{len(hints)}: {hints[n]}{more}"
        state["hints_seen"][name] = n + 1
        _save(state)
    print(text)
    return text


def solution_source(name: str) -> str:
    """The source of the worked solution for exercise ``name`` (from ``labkit/solutions/nbNN.py``)."""
    _, solution = _exercise(name)
    if solution is None:
        nb, ex = name.split(".", 1)
        raise LookupError(f"no worked solution {ex!r} in labkit/solutions/{nb}.py")
    return inspect.getsource(solution)


def show_solution(name: str):
    """Show the worked solution of exercise ``name``; noted in your progress file (not as a pass)."""
    source = solution_source(name)
    state = load()
    state["solutions_seen"].setdefault(name, _now())
    _save(state)
    try:
        from IPython.display import Code
    except ImportError:
        print(source)
        return None
    return Code(source, language="python")
