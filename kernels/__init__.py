"""Triton kernels of the lab, one kernel family per file. Importing this package sets up CPU/GPU mode."""
import labkit.device  # noqa: F401  (sets TRITON_INTERPRET before triton is imported)
