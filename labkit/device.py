"""Where the lab's code runs: a real GPU, or Triton's interpreter on the CPU.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported. So this module must run before
anything imports triton; ``import labkit`` (or ``import kernels``) takes care of that. With no CUDA
device the interpreter is switched on and every kernel in ``kernels/`` runs, slowly, on the CPU;
with one, the same kernels compile for the GPU. No notebook or test changes anything else.
"""
from __future__ import annotations

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


def describe() -> str:
    """One line saying where kernels and models run, for the top of every notebook."""
    if MODE == "gpu":
        name = torch.cuda.get_device_name()
        return f"labkit mode: gpu ({name}); Triton kernels compile for the GPU, figures can be re-measured live."
    return (
        "labkit mode: interpreter (no CUDA device); Triton kernels run on the CPU through TRITON_INTERPRET=1, "
        "slowly and on small shapes; GPU figures are replotted from data/bench."
    )
