"""Worked solutions for notebook 08."""
import torch


def pack_int4(codes, group_size):
    n, k = codes.shape
    half = group_size // 2
    out = torch.empty(n, k // 2, dtype=torch.uint8)
    for g in range(k // group_size):
        lo = codes[:, g * group_size: g * group_size + half]  # weights j of the group
        hi = codes[:, g * group_size + half: (g + 1) * group_size]  # weights j + G/2
        out[:, g * half: (g + 1) * half] = lo | (hi << 4)
    return out


def unpack_int4(packed, group_size):
    n, kb = packed.shape
    half = group_size // 2
    out = torch.empty(n, 2 * kb, dtype=torch.uint8)
    for g in range(2 * kb // group_size):
        b = packed[:, g * half: (g + 1) * half]
        out[:, g * group_size: g * group_size + half] = b & 0x0F  # low nibble: first half of the group
        out[:, g * group_size + half: (g + 1) * group_size] = b >> 4  # high nibble: second half
    return out


def group_scale_zero(group):
    lo = min(float(group.min()), 0.0)
    hi = max(float(group.max()), 0.0)
    scale = (hi - lo) / 15 or 1.0
    zero = min(max(round(-lo / scale), 0), 15)
    return scale, int(zero)
