"""One switch for CPU or GPU: importing labkit before triton turns the interpreter on when no GPU is present."""
import os
import subprocess
import sys

import torch

import labkit


def test_mode_matches_hardware():
    assert labkit.MODE == ("gpu" if torch.cuda.is_available() else "interpreter")
    assert labkit.MODE in labkit.describe()


def test_triton_imported_first_gives_a_clear_error():
    if torch.cuda.is_available():
        return  # on a GPU the order does not matter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", "import triton, labkit"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "Import labkit (or kernels) before triton" in proc.stderr


def test_a_triton_kernel_runs_here():
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    x = torch.arange(10, dtype=torch.float32, device=labkit.DEVICE)
    add_one[(1,)](x, 10, BLOCK=16)
    assert torch.equal(x.cpu(), torch.arange(1, 11, dtype=torch.float32))
