"""Notebook 10 exercises: pack and unpack four ternary weights, absmean ternarisation, a packed dot product."""
import torch

from kernels.ternary import pack_ternary, unpack_ternary
from labkit.exercises import Exercise
from labkit.ternary import absmean_ternarise


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _pack_byte_ref(w):
    return int(pack_ternary(torch.tensor([w]))[0, 0])


def _unpack_byte_ref(b):
    return unpack_ternary(torch.tensor([[b]], dtype=torch.uint8))[0].tolist()


def _weights(gen):
    return (torch.randn(_int(gen, 1, 9), 4 * _int(gen, 1, 9), generator=gen) * 0.05,)


def _dot_inputs(gen):
    k = 4 * _int(gen, 1, 17)
    t = torch.randint(-1, 2, (1, k), generator=gen)
    return torch.randn(k, generator=gen), pack_ternary(t)[0], float(torch.rand(1, generator=gen)) + 0.1


def _dot_ref(x, packed_row, scale):
    return float(x.double() @ unpack_ternary(packed_row[None], torch.float64)[0]) * scale


EXERCISES = {
    "pack_byte": Exercise(
        reference=_pack_byte_ref, make_inputs=lambda g: ([_int(g, -1, 2) for _ in range(4)],),
        spec="w: four weights in {-1, 0, +1} -> one byte (an int 0..255): weight i stored as the code w + 1 "
             "in bits 2i..2i+1 (the first weight in the lowest bits)."),
    "unpack_byte": Exercise(
        reference=_unpack_byte_ref, make_inputs=lambda g: (_pack_byte_ref([_int(g, -1, 2) for _ in range(4)]),),
        spec="the inverse of pack_byte: one byte -> the list of its four weights in {-1, 0, +1}."),
    "absmean_ternarise": Exercise(
        reference=absmean_ternarise, make_inputs=_weights, compare="allclose", atol=1e-6, rtol=1e-5,
        spec="w (N, K) -> (T, scale): scale = mean |w| as a shape-(1,) float32 tensor, "
             "T = clamp(round(w / (scale + 1e-5)), -1, 1) as int8."),
    "ternary_dot": Exercise(
        reference=_dot_ref, make_inputs=_dot_inputs, compare="allclose", atol=1e-4, rtol=1e-4,
        spec="x (K,) float, packed_row (K // 4,) uint8 (four 2-bit weights a byte), scale float -> "
             "the float scale * sum_k x[k] * T[k]."),
}
