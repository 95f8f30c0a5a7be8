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
    w = torch.randn(_int(gen, 1, 9), 4 * _int(gen, 1, 9), generator=gen) * [0.05, 1.0, 30.0][_int(gen, 0, 3)]
    if _int(gen, 0, 10) == 0:
        w.zero_()  # an all-zero matrix: scale 0, and T must be 0 (the 1e-5 keeps 0 / 0 away)
    return (w,)


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
             "in bits 2i..2i+1 (the first weight in the lowest bits).",
        hints=("Weight i becomes the code w[i] + 1 (0, 1 or 2): never negative, two bits wide.",
               "Shift code i left by 2 * i and OR (or add) the four together: weight 0 ends in bits 0-1.")),
    "unpack_byte": Exercise(
        reference=_unpack_byte_ref, make_inputs=lambda g: (_pack_byte_ref([_int(g, -1, 2) for _ in range(4)]),),
        spec="the inverse of pack_byte: one byte -> the list of its four weights in {-1, 0, +1}.",
        hints=("(b >> (2 * i)) & 3 is the i-th two-bit field; subtract 1 to get the weight back.",)),
    "absmean_ternarise": Exercise(
        reference=absmean_ternarise, make_inputs=_weights, compare="allclose", atol=1e-6, rtol=1e-5,
        spec="w (N, K) -> (T, scale): scale = mean |w| as a shape-(1,) float32 tensor, "
             "T = clamp(round(w / (scale + 1e-5)), -1, 1) as int8.",
        output_names=("T", "scale"),
        hints=("scale = w.abs().mean() is a 0-d tensor; .reshape(1) gives the shape (1,) the spec asks for.",
               "torch.round, then torch.clamp(..., -1, 1), then .to(torch.int8): T must be integers, not floats.")),
    "ternary_dot": Exercise(
        reference=_dot_ref, make_inputs=_dot_inputs, compare="allclose", atol=1e-4, rtol=1e-4,
        spec="x (K,) float, packed_row (K // 4,) uint8 (four 2-bit weights a byte), scale float -> "
             "the float scale * sum_k x[k] * T[k].",
        hints=("Weight k is field k % 4 of byte k // 4: unpack each byte as in exercise 2.",
               "Add x[k] where the weight is +1, subtract where it is -1, skip the zeros; multiply by scale once.")),
}
