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


# ---- build-it exercises: a plausible wrong solution of each is caught, and the message names what differs ----
def _nb04():
    from labkit.exercises.nb04 import EXERCISES
    from labkit.solutions.nb04 import BlockAllocator

    return EXERCISES, BlockAllocator


def test_block_allocator_wrong_solutions_are_caught_and_named():
    from labkit.paged import NoFreeBlocksError

    exercises, Right = _nb04()

    class Newest(Right):  # hands out the most recently freed block: not LRU
        def allocate(self):
            if not self.free_list:
                raise NoFreeBlocksError("none free")
            b = self.free_list.pop()
            self.ref_count[b] = 1
            return b

    class NoDoubleFreeCheck(Right):
        def free(self, block_id):
            self._check(block_id)
            if self.ref_count[block_id] > 0:
                super().free(block_id)

    class IgnoresRefCount(Right):  # frees on the first free, whoever else holds the block
        def free(self, block_id):
            super().free(block_id)
            if self.ref_count[block_id] > 0:
                self.ref_count[block_id] = 0
                self.free_list.append(block_id)

    class NoRangeCheck(Right):
        def _check(self, block_id):
            pass

    ex = exercises["block_allocator"]
    for wrong, what in ((Newest, "returned"), (NoDoubleFreeCheck, "raised"), (IgnoresRefCount, "free list"),
                        (NoRangeCheck, "raised")):
        ok, msg = run_trials(wrong, ex)
        assert not ok and "operation" in msg and what in msg and "False" not in msg, (wrong.__name__, msg)


@pytest.mark.timeout(120)
def test_block_allocator_in_the_engine_catches_a_free_list_in_the_wrong_order():
    exercises, Right = _nb04()

    class Newest(Right):
        def allocate(self):
            b = self.free_list.pop()
            self.ref_count[b] = 1
            return b

    ok, msg = run_trials(Newest, exercises["block_allocator_in_engine"])
    assert not ok and "blocks went elsewhere" in msg and "free list" in msg


def test_schedule_step_wrong_solutions_are_caught_and_named():
    from labkit.exercises.nb03 import EXERCISES
    from labkit.solutions.nb03 import schedule_step

    ex = EXERCISES["schedule_step"]

    def overtakes(running, waiting, free_blocks, block_size, max_num_seqs, token_budget):
        kept = [w for w in waiting if -(-(w[1] + w[2]) // block_size) <= free_blocks]  # skips the head
        return schedule_step(running, kept, free_blocks, block_size, max_num_seqs, token_budget)

    def decodes_everyone(running, waiting, free_blocks, block_size, max_num_seqs, token_budget):
        sched, adm = schedule_step(running, waiting, free_blocks, block_size, max_num_seqs, token_budget + len(running))
        return sched, adm

    def reserves_prompt_only(running, waiting, free_blocks, block_size, max_num_seqs, token_budget):
        return schedule_step(running, [(s, p, 1) for s, p, _ in waiting], free_blocks, block_size, max_num_seqs,
                             token_budget)

    for wrong in (overtakes, decodes_everyone, reserves_prompt_only):
        ok, msg = run_trials(wrong, ex)
        assert not ok and ("scheduled" in msg or "admitted" in msg) and "expected" in msg, (wrong.__name__, msg)
