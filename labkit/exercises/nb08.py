"""Notebook 08 exercises: the int4 layout and one group's scale and zero point."""
import torch

from kernels.quant_matmul import pack_int4, unpack_int4
from labkit.exercises import Exercise
from labkit.quant import group_scale_zero


def _codes(gen):
    group_size = [32, 64, 128][int(torch.randint(0, 3, (1,), generator=gen))]
    rows, groups = (int(v) for v in torch.randint(1, 5, (2,), generator=gen))
    codes = torch.randint(0, 16, (rows, groups * group_size), generator=gen, dtype=torch.uint8)
    return codes, group_size


def _packed(gen):
    codes, group_size = _codes(gen)
    return pack_int4(codes, group_size), group_size


def _group(gen):
    g = torch.randn(32, generator=gen) * float(torch.rand(1, generator=gen) * 0.1 + 0.01)
    shift = int(torch.randint(0, 3, (1,), generator=gen))  # some groups all positive / all negative
    return (g + g.abs().max() * (shift - 1) * 1.5,)


def _scale_zero(group):
    scale, zero = group_scale_zero(group)
    return float(scale), int(zero)


EXERCISES = {
    "pack_int4": Exercise(
        reference=pack_int4, make_inputs=_codes,
        spec="codes (N, K) uint8 in 0..15, group_size G -> (N, K // 2) uint8; within each group of G, "
             "byte j holds code j in its low nibble and code j + G/2 in its high nibble."),
    "unpack_int4": Exercise(
        reference=unpack_int4, make_inputs=_packed,
        spec="the inverse of pack_int4: (N, K // 2) uint8 and G -> (N, K) uint8 codes."),
    "group_scale_zero": Exercise(
        reference=_scale_zero, make_inputs=_group, compare="allclose", atol=1e-6, rtol=1e-5,
        spec="one group of weights (G,) -> (scale, zero): lo = min(w.min(), 0), hi = max(w.max(), 0), "
             "scale = (hi - lo) / 15 (1.0 if that is 0), zero = round(-lo / scale) clamped to 0..15, as an int."),
}
