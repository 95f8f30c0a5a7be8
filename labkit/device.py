"""Where the lab's code runs: a real GPU, or Triton's interpreter on the CPU.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported. So this module must run before
anything imports triton; ``import labkit`` (or ``import kernels``) takes care of that. With no CUDA
device the interpreter is switched on and every kernel in ``kernels/`` runs, slowly, on the CPU;
with one, the same kernels compile for the GPU. No notebook or test changes anything else.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

HAS_GPU: bool = torch.cuda.is_available()

if not HAS_GPU:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "triton was imported before labkit, so it cannot be switched to its CPU interpreter. "
            "Import labkit (or kernels) before triton, or set TRITON_INTERPRET=1 before starting Python, "
            "then restart the kernel."
        )
    os.environ["TRITON_INTERPRET"] = "1"

INTERPRETER: bool = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
MODE = "interpreter" if INTERPRETER else "gpu"


DEFAULT_THREADS = 2  # a notebook's fair share of a workshop server; LABKIT_THREADS overrides it


def limit_threads(n: int | None = None) -> int:
    """Cap the CPU threads torch uses in this kernel, so that many notebooks on one machine do not fight.

    ``n``, else the ``LABKIT_THREADS`` environment variable, else ``min(2, cores)``. Torch's default is one
    thread per core in every kernel: 30 learners on a 16-core server would run 480 threads that mostly wait for
    each other. Every notebook calls this in its first cell; on your own idle machine set ``LABKIT_THREADS`` to
    your core count to go faster. Returns the number of threads now in use.
    """
    if n is None:
        env = os.environ.get("LABKIT_THREADS")
        if env is None:
            n = min(DEFAULT_THREADS, os.cpu_count() or 1)
        elif not env.strip().isdigit() or int(env) < 1:
            raise ValueError(f"LABKIT_THREADS={env!r}: set it to a whole number of threads >= 1 (e.g. 1 on a shared "
                             "workshop server), or unset it for the default of 2")
        else:
            n = int(env)
    if n < 1:
        raise ValueError(f"limit_threads(n={n}): a kernel needs at least one thread")
    torch.set_num_threads(n)
    return torch.get_num_threads()


@contextlib.contextmanager
def threads(n: int):
    """Run a block with ``n`` torch threads (e.g. 1 for a timing), then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def describe() -> str:
    """One line saying where kernels and models run, for the top of every notebook."""
    if MODE == "gpu":
        name = torch.cuda.get_device_name()
        return (f"labkit mode: gpu ({name}); Triton kernels compile for the GPU, figures can be re-measured live. "
                f"{_threads_note()}")
    return (
        "labkit mode: interpreter (no CUDA device); Triton kernels run on the CPU through TRITON_INTERPRET=1, "
        f"slowly and on small shapes; GPU figures are replotted from data/bench. {_threads_note()}"
    )


def _threads_note() -> str:
    n = torch.get_num_threads()
    return f"torch uses {n} CPU thread{'s' if n != 1 else ''} (labkit.limit_threads; set LABKIT_THREADS to change)."
