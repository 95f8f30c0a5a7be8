"""Every worked solution passes its exercise; a wrong answer is caught and shown."""
import importlib
import pkgutil

import pytest
import torch

import labkit.exercises as exercises_pkg
from labkit.exercises import Exercise, check, run_trials

NOTEBOOKS = sorted(m.name for m in pkgutil.iter_modules(exercises_pkg.__path__))
ALL = [(nb, name) for nb in NOTEBOOKS for name in importlib.import_module(f"labkit.exercises.{nb}").EXERCISES]


@pytest.mark.parametrize("nb,name", ALL, ids=[f"{nb}.{n}" for nb, n in ALL])
def test_solution_passes(nb, name):
    ex = importlib.import_module(f"labkit.exercises.{nb}").EXERCISES[name]
    solution = getattr(importlib.import_module(f"labkit.solutions.{nb}"), name)
    ok, msg = run_trials(solution, ex)
    assert ok, msg


def test_checker_catches_a_wrong_answer_and_shows_it():
    ex = Exercise(reference=lambda a, b: a + b, make_inputs=lambda g: (int(torch.randint(0, 9, (1,), generator=g)), 3))
    ok, msg = run_trials(lambda a, b: a + b + (a == 5), ex)
    assert not ok and "inputs" in msg and "expected" in msg


def test_unattempted_exercise_does_not_raise(monkeypatch, capsys):
    if not ALL:
        pytest.skip("no exercises yet")
    nb, name = ALL[0]
    monkeypatch.delenv("LABKIT_SOLUTIONS", raising=False)

    def stub(*args):
        raise NotImplementedError

    assert check(f"{nb}.{name}", stub) is False
    assert "not attempted" in capsys.readouterr().out
    monkeypatch.setenv("LABKIT_SOLUTIONS", "1")
    assert check(f"{nb}.{name}", stub) is True


def test_engine_step_exercise_catches_a_loop_that_drops_the_tokens():
    """nb11: a step that schedules and runs but never post-processes cannot finish any request."""
    ex = importlib.import_module("labkit.exercises.nb11").EXERCISES["engine_step"]

    def forgets_postprocess(scheduler, runner, now):
        return runner.execute(scheduler.schedule())

    with pytest.raises(AssertionError, match="did not finish"):
        run_trials(forgets_postprocess, ex)

    def samples_the_wrong_token(scheduler, runner, now):
        out = scheduler.schedule()
        tokens = {k: (v + 1) % 61 for k, v in runner.execute(out).items()}
        return scheduler.postprocess(out, tokens, now)

    ok, msg = run_trials(samples_the_wrong_token, ex)
    assert not ok and "tokens" in msg
