"""labkit: the library behind the notebooks. Importing it first sets up Triton for CPU or GPU."""
from labkit import device  # noqa: F401  (must run before anything imports triton)
from labkit.device import DEVICE, HAS_GPU, MODE, describe

__all__ = ["DEVICE", "HAS_GPU", "MODE", "describe"]
