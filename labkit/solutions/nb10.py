"""Worked solutions for notebook 10."""
import torch


def pack_byte(w):
    byte = 0
    for i, weight in enumerate(w):
        byte |= (weight + 1) << (2 * i)  # code 0, 1, 2 for -1, 0, +1; weight i in bits 2i, 2i+1
    return byte


def unpack_byte(b):
    return [((b >> (2 * i)) & 3) - 1 for i in range(4)]


def absmean_ternarise(w):
    scale = w.abs().mean().reshape(1).float()
    t = torch.clamp(torch.round(w / (scale + 1e-5)), -1, 1).to(torch.int8)
    return t, scale


def ternary_dot(x, packed_row, scale):
    total = 0.0
    for j, byte in enumerate(packed_row.tolist()):
        for i, weight in enumerate(unpack_byte(byte)):
            total += float(x[4 * j + i]) * weight  # add, subtract or skip: no multiplications needed
    return total * scale
