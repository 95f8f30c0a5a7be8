"""Exercises: the learner writes a function, ``check`` runs it against the lab's reference.

Convention (every notebook follows it):

    def kv_bytes_per_token(config, dtype_bytes):
        # YOUR CODE
        raise NotImplementedError

    check("nb02.kv_bytes_per_token", kv_bytes_per_token)

Each notebook NN has ``labkit/exercises/nbNN.py`` with ``EXERCISES = {name: Exercise(...)}`` (the
reference and a random-input generator) and ``labkit/solutions/nbNN.py`` with a worked solution of
the same name. ``check`` runs the learner's function and the reference on ``trials`` random inputs and
prints "correct" or raises ``AssertionError`` showing the first input where they differ.

A function that still raises ``NotImplementedError`` is "not attempted yet": check says so and returns,
so Run All never stops on an unfinished exercise. With ``LABKIT_SOLUTIONS=1`` (``make test`` and CI set
it) the worked solution is checked in its place, so every exercise is exercised in CI.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable

import torch


@dataclasses.dataclass
class Exercise:
    reference: Callable
    make_inputs: Callable[[torch.Generator], tuple]
    spec: str = ""
    # A function that plugs into the package (the learner's append_slot inside a block manager, their
    # choose_victim inside the engine) is driven by harness(fn, *inputs), which returns what to compare.
    harness: Callable | None = None
    compare: str = "exact"  # "exact" (==, torch.equal for tensors) or "allclose"
    adapt: Callable | None = None  # learner's object -> the function compared (e.g. a class -> run ops on it)
    explain: Callable | None = None  # (inputs, yours, expected) -> what differs, in words (default: show both)
    atol: float = 1e-5
    rtol: float = 1e-4
    trials: int = 20
    hints: tuple[str, ...] = ()  # shown one at a time by labkit.progress.hint(name)
    # Names of a returned tuple's elements, e.g. ("m", "l", "acc"): a mismatch then says "`l` differs".
    output_names: tuple[str, ...] = ()


def _lookup(name: str) -> tuple[Exercise, Callable | None]:
    if "." not in name:
        raise ValueError(f"exercise names look like 'nb02.reservation_waste', got {name!r}")
    nb, ex = name.split(".", 1)
    table = importlib.import_module(f"labkit.exercises.{nb}").EXERCISES
    if ex not in table:
        raise KeyError(f"no exercise {ex!r} in notebook {nb}; there are: {sorted(table)}")
    try:
        solution = getattr(importlib.import_module(f"labkit.solutions.{nb}"), ex, None)
    except ModuleNotFoundError:
        solution = None
    return table[ex], solution


def _same(a: Any, b: Any, ex: Exercise) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return False
        if ex.compare == "allclose":
            return torch.allclose(a.double(), b.double(), atol=ex.atol, rtol=ex.rtol)
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y, ex) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], ex) for k in a)
    if ex.compare == "allclose" and isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= ex.atol + ex.rtol * abs(b)
    return a == b


def _where(path: tuple, names: tuple[str, ...]) -> str:
    """'`l` (element 1)' or 'element 2 -> key 'slots'' for a path of tuple indices and dict keys."""
    if not path:
        return "the returned value"
    parts = []
    for depth, step in enumerate(path):
        if isinstance(step, int):
            named = depth == 0 and step < len(names)
            parts.append(f"`{names[step]}` (element {step})" if named else f"element {step}")
        else:
            parts.append(f"key {step!r}")
    return " -> ".join(parts)


def first_difference(got: Any, expected: Any, ex: Exercise) -> str | None:
    """None if ``got`` matches ``expected`` (as ``_same`` decides), else a sentence saying which part differs
    and how: the tuple element (by ``ex.output_names``) or dict key, then shape, dtype, NaN or the first value."""
    found = _difference(got, expected, ex)
    return None if found is None else found[1]


def _difference(got: Any, expected: Any, ex: Exercise, path: tuple = ()) -> tuple[tuple, str] | None:
    """(path of tuple indices and dict keys, sentence) of the first difference, or None."""
    where = _where(path, ex.output_names)
    if isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor):
        if got.shape != expected.shape:
            return path, f"{where}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        kinds = (got.dtype.is_floating_point, expected.dtype.is_floating_point)
        if (ex.compare != "allclose" and got.dtype != expected.dtype) or kinds[0] != kinds[1]:
            return path, f"{where}: dtype {got.dtype}, expected {expected.dtype}"
        if _same(got, expected, ex):
            return None
        if got.dtype.is_floating_point and not torch.isfinite(got).all() and torch.isfinite(expected).all():
            bad = (~torch.isfinite(got)).nonzero()[0].tolist()
            return path, (f"{where}: yours has {got[tuple(bad)].item()} at index {tuple(bad)} where the reference is "
                    f"finite ({expected[tuple(bad)].item():.6g}): an overflow? (exp of a large number)")
        far = ~torch.isclose(got.double(), expected.double(), atol=ex.atol if ex.compare == "allclose" else 0,
                             rtol=ex.rtol if ex.compare == "allclose" else 0)
        idx = tuple(far.nonzero()[0].tolist())
        return path, (f"{where}: at index {idx} yours is {got[idx].item():.6g}, expected {expected[idx].item():.6g}"
                f" ({int(far.sum())} of {far.numel()} entries differ)")
    if isinstance(got, torch.Tensor) != isinstance(expected, torch.Tensor):
        return path, f"{where}: yours is a {type(got).__name__}, expected a {type(expected).__name__}"
    if isinstance(got, (tuple, list)) and isinstance(expected, (tuple, list)):
        if len(got) != len(expected):
            return path, f"{where}: {len(got)} elements, expected {len(expected)}"
        for i, (x, y) in enumerate(zip(got, expected)):
            diff = _difference(x, y, ex, path + (i,))
            if diff is not None:
                return diff
        return None
    if isinstance(got, dict) and isinstance(expected, dict):
        keys_differ = f"{where}: keys {sorted(map(str, got))}, expected {sorted(map(str, expected))}"
        for k in list(expected) + [k for k in got if k not in expected]:  # the first key that is missing or differs
            if k not in got or k not in expected:
                return path + (k,), keys_differ
            diff = _difference(got[k], expected[k], ex, path + (k,))
            if diff is not None:
                return diff
        return None
    if _same(got, expected, ex):
        return None
    return path, f"{where}: yours is {_show(got, 120)}, expected {_show(expected, 120)}"


def _show(x: Any, limit: int = 300) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[:limit] + " ..."


def _at(x: Any, path: tuple) -> Any:
    """The part of an output a path names ("(nothing)" for a dict key it lacks)."""
    for step in path:
        if isinstance(x, dict) and step not in x:
            return "(nothing)"
        x = x[step]
    return x


def run_trials(fn: Callable, ex: Exercise, seed: int = 0) -> tuple[bool, str]:
    """(passed, message). Inputs are drawn afresh for each trial; each side gets its own copy."""
    import copy

    gen = torch.Generator().manual_seed(seed)
    call = (lambda f, a: ex.harness(f, *a)) if ex.harness is not None else (lambda f, a: f(*a))
    learner = ex.adapt(fn) if ex.adapt is not None else fn
    for trial in range(ex.trials):
        args = ex.make_inputs(gen)
        expected = call(ex.reference, copy.deepcopy(args))
        got = call(learner, copy.deepcopy(args))
        found = _difference(got, expected, ex)  # None when they match (dtype kinds included)
        if found is not None:
            if ex.explain is not None:
                return False, f"mismatch on trial {trial + 1}/{ex.trials}\n{ex.explain(args, got, expected)}"
            path, diff = found
            where = "".join(f"[{step!r}]" for step in path)
            detail = (f"\n  first difference at {where}: yours {_show(_at(got, path))}, "
                      f"expected {_show(_at(expected, path))}") if path else ""
            return False, (f"mismatch on trial {trial + 1}/{ex.trials}: {diff}{detail}\n  inputs:   {_show(args)}\n"
                           f"  yours:    {_show(got)}\n  expected: {_show(expected)}")
    return True, f"correct: matched the reference on {ex.trials} random inputs"


def check(name: str, fn: Callable) -> bool:
    """Check the learner's ``fn`` for exercise ``name`` ('nbNN.exercise'). See the module docstring."""
    ex, solution = _lookup(name)
    try:
        ok, msg = run_trials(fn, ex)
    except NotImplementedError:
        if os.environ.get("LABKIT_SOLUTIONS") == "1" and solution is not None:
            ok, msg = run_trials(solution, ex)
            msg = "(LABKIT_SOLUTIONS=1: checked the worked solution) " + msg
        else:
            print(f"{name}: not attempted yet: fill in the cell marked # YOUR CODE, then run it again.")
            return False
    else:
        if ok:
            from labkit.progress import record_pass

            record_pass(name)  # the learner's own function passed: labkit.progress() shows it
    if not ok:
        raise AssertionError(f"{name}: {msg}")
    print(f"{name}: {msg}")
    return True


from labkit.progress import hint, show_solution  # noqa: E402  (so a notebook imports check, hint, show_solution)
