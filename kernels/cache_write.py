"""Writing new keys and values into a paged KV cache through a slot mapping.

What you will learn
-------------------
* The **slot** of a token is its flat row in the cache: ``slot = block_id * block_size + offset``, where
  ``block_id`` comes from the sequence's block table and ``offset = position % block_size``. The
  scheduler computes one slot per new token (``slot_mapping``); the kernel needs nothing else.
* Padding tokens (batches padded to one length) get ``slot = -1`` and are skipped.
* A token's row ``cache[block_id, offset]`` holds all KV heads, ``num_kv_heads * head_dim`` contiguous
  values, so one program copies one token for K and for V.

The algorithm::

    for each new token t in parallel:
        slot = slot_mapping[t]
        if slot < 0: skip                                  # padding
        block_id, offset = slot // block_size, slot % block_size
        k_cache[block_id, offset, :, :] = k[t]             # (num_kv_heads, head_dim)
        v_cache[block_id, offset, :, :] = v[t]
"""
from __future__ import annotations

import torch

import labkit.device  # noqa: F401  (switches Triton to its interpreter when there is no GPU)
import triton
import triton.language as tl


def cache_write_ref(k, v, k_cache, v_cache, slot_mapping):
    """Plain torch, in place: rows ``slot_mapping[t] >= 0`` of the flattened caches get k[t], v[t]."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = k[keep]
    v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = v[keep]


@triton.jit
def _cache_write_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int32 or int64, -1 = padding
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,  # k_cache and v_cache share strides
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,  # NUM_KV_HEADS rounded up to a power of two
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
):
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block_id = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    dst = block_id * stride_cb + offset * stride_cs + h * stride_ch + d  # (BLOCK_H, BLOCK_D)
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask), mask=mask)


def cache_write(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v (num_tokens, num_kv_heads, head_dim) into the paged caches in place.

    k_cache, v_cache: (num_blocks, block_size, num_kv_heads, head_dim); slot_mapping: (num_tokens,)
    int32/int64 with ``slot = block_id * block_size + offset`` per token, or -1 to skip a padding token.
    """
    for name, t in dict(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping).items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"k and v must both be (num_tokens, num_kv_heads, head_dim), got {tuple(k.shape)} and {tuple(v.shape)}; "
            "for (B, H, T, D) tensors pass k.transpose(1, 2).reshape(-1, H, D)."
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be (num_blocks, block_size, num_kv_heads, head_dim), got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}."
        )
    num_tokens, num_kv_heads, head_dim = k.shape
    num_blocks, block_size = k_cache.shape[:2]
    if k_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"k has (num_kv_heads, head_dim) = {(num_kv_heads, head_dim)} but the cache has {tuple(k_cache.shape[2:])}."
        )
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype or k.dtype != v.dtype:
        raise ValueError(
            f"k, v and the caches must share one dtype, got {k.dtype}, {v.dtype}, {k_cache.dtype}, {v_cache.dtype}; "
            "cast k and v with .to(k_cache.dtype)."
        )
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("the caches must share strides, and every last dim must be contiguous; call .contiguous().")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_mapping must be an int32/int64 ({num_tokens},) tensor, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}."
        )
    devices = {t.device for t in (k, v, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}.")
    if k.device.type == "cpu" and not labkit.device.INTERPRETER:
        raise ValueError("the inputs are on the CPU but Triton compiles for the GPU here: move them to 'cuda'.")
    if k.device.type == "cpu" and num_tokens:  # value checks are free on the CPU
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        if lo < -1 or hi >= num_blocks * block_size:
            raise ValueError(
                f"slot_mapping values must be -1 (skip) or in [0, num_blocks * block_size = {num_blocks * block_size}), "
                f"got min {lo} and max {hi}."
            )
    if num_tokens == 0:
        return
    _cache_write_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), *k_cache.stride()[:3],
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=1 if num_kv_heads * head_dim <= 256 else 4,
    )
