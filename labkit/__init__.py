"""labkit: the library behind the notebooks. Importing it first sets up Triton for CPU or GPU."""
from labkit import device  # noqa: F401  (must run before anything imports triton)
from labkit.device import DEVICE, HAS_GPU, MODE, describe, limit_threads
from labkit.notebook import setup_notebook
# labkit.progress() is the function (the module stays importable: from labkit.progress import hint).
from labkit.progress import hint, progress, show_solution

__all__ = ["DEVICE", "HAS_GPU", "MODE", "describe", "hint", "limit_threads", "progress", "setup_notebook",
           "show_solution"]
