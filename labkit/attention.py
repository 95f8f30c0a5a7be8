"""Causal grouped-query attention in plain torch: the reference every cache and kernel is checked against."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None = None,
                  scale: float | None = None) -> torch.Tensor:
    """Causal GQA attention.

    q: (B, Hq, Tq, D); k, v: (B, Hkv, Tk, D) with Hq a multiple of Hkv (each KV head serves Hq // Hkv
    consecutive query heads); q_pos: (B, Tq) and k_pos: (B, Tk) absolute positions; k_valid: optional
    (B, Tk) bool, False for slots that hold no token. A query sees every valid key at a position <= its
    own. Softmax in fp32; returns (B, Hq, Tq, D) in q's dtype.
    """
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    group = Hq // Hkv
    if k_valid is not None:
        # Slots that hold no token may hold anything (a freed block's old data, even NaN): a mask alone is
        # not enough, since 0 * NaN = NaN in the weighted sum. Zero them so they cannot leak.
        keep = k_valid[:, None, :, None]
        k, v = torch.where(keep, k, 0), torch.where(keep, v, 0)
    k = k.repeat_interleave(group, dim=1)  # (B, Hq, Tk, D)
    v = v.repeat_interleave(group, dim=1)
    mask = k_pos[:, None, :] <= q_pos[:, :, None]  # (B, Tq, Tk)
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    out = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask[:, None], scale=scale
    )  # (B, Hq, Tq, D)
    return out.to(q.dtype)
