"""labkit.progress(): check() records the learner's passes; hint() and show_solution() help on request."""
import json

import pytest

import labkit
from labkit.exercises import Exercise, check
from labkit.progress import hint, load, progress, show_solution, solution_source
from labkit.solutions import nb02


@pytest.fixture(autouse=True)
def progress_file(tmp_path, monkeypatch):
    path = tmp_path / "progress.json"
    monkeypatch.setenv("LABKIT_PROGRESS", str(path))
    return path


def test_a_pass_by_the_learner_is_recorded(progress_file):
    assert check("nb02.reservation_waste", nb02.reservation_waste)
    assert "nb02.reservation_waste" in json.loads(progress_file.read_text())["passed"]
    shown = progress()
    assert shown.num_passed == 1 and shown.num_exercises >= 2
    assert "[x] reservation_waste" in repr(shown) and "[ ] write_and_read" in repr(shown)
    assert "reservation_waste" in shown._repr_html_()
    assert labkit.progress is progress  # the package-level call the notebooks use


def test_the_worked_solution_standing_in_for_a_stub_is_not_a_pass(progress_file, monkeypatch):
    monkeypatch.setenv("LABKIT_SOLUTIONS", "1")

    def stub(prompt_len, output_len, reserved):
        raise NotImplementedError

    assert check("nb02.reservation_waste", stub)
    assert load()["passed"] == {}


def test_a_wrong_answer_is_not_recorded(progress_file):
    with pytest.raises(AssertionError):
        check("nb02.reservation_waste", lambda prompt_len, output_len, reserved: 0)
    assert load()["passed"] == {}


def test_hints_come_one_at_a_time_then_point_at_the_solution():
    first = hint("nb02.reservation_waste")
    second = hint("nb02.reservation_waste")
    assert "hint 1/" in first and "hint 2/" in second and first != second
    for _ in range(5):
        last = hint("nb02.reservation_waste")
    assert "show_solution" in last


def test_an_exercise_without_hints_shows_its_spec(monkeypatch):
    import dataclasses

    import labkit.exercises.nb10 as nb10

    assert Exercise(reference=abs, make_inputs=lambda g: (1,)).hints == ()  # the default other exercises get
    bare = dataclasses.replace(nb10.EXERCISES["ternary_dot"], hints=())
    monkeypatch.setitem(nb10.EXERCISES, "ternary_dot", bare)
    text = hint("nb10.ternary_dot")
    assert "spec" in text and "show_solution" in text


def test_show_solution_is_the_worked_solution_and_is_noted():
    code = show_solution("nb02.reservation_waste")
    assert code.data == solution_source("nb02.reservation_waste")
    assert "def reservation_waste" in code.data
    assert "nb02.reservation_waste" in load()["solutions_seen"]


def test_an_unwritable_progress_file_warns_but_check_still_passes(monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("LABKIT_PROGRESS", str(blocker / "progress.json"))  # its parent is a file
    with pytest.warns(UserWarning, match="LABKIT_PROGRESS"):
        assert check("nb02.reservation_waste", nb02.reservation_waste)


def test_unknown_names_fail_loudly():
    with pytest.raises(KeyError, match="no exercise"):
        hint("nb02.no_such_exercise")
