"""The engine's quantised KV store: int8 (or fp8 e4m3) codes plus one fp32 scale per (token, KV head).

A block is what the engine moves (copy-on-write, swap out, swap in), so a block carries its own scales::

    k_cache[layer, block_id]  one row of bytes:  | codes (block_size, num_kv_heads, head_dim) | scales (block_size, num_kv_heads) fp32 |
    k_codes[layer]            a view of the codes:  (num_blocks, block_size, num_kv_heads, head_dim) int8 / fp8
    k_scale[layer]            a view of the scales: (num_blocks, block_size, num_kv_heads) fp32

``PagedKVStore``'s block moves index ``k_cache[:, block_ids]`` and so move codes and scales together: no
scale can be left behind by a copy or a swap. The runner's swap space is sized from ``k_cache`` too, so it
holds the scales without knowing they exist. (vLLM keeps fp8 scales per tensor or per head; per token and
head is the granularity notebook 09 shows to be the accurate one.)

    write   every layer, every new token: quantise (scale = max|x| / QMAX, codes = round(x / scale)) at its slot
            GPU: kernels/paged_attention_int8kv.py cache_write_quant;  CPU: quantise_kv_ref (torch)
    read    decode-only step on the GPU: paged_attention_int8kv (dequantises inside the loop, no host sync,
            so the step can be captured in a CUDA graph)
            anything else: dequantise the blocks the step reads, then the fp path (the prefill kernel on the
            GPU, plain-torch attention on the CPU)

Attention always reads the quantised values, in prefill too, so every token sees what decoding sees.
fp8 on the CPU never goes through Triton's interpreter: it converts fp32 -> fp8 e4m3 wrongly (see
``cache_write_quant``), so the CPU path quantises with torch.
"""
from __future__ import annotations

import torch

from kernels.paged_attention_int8kv import (
    KV_FORMATS,
    SCALE_DTYPE,
    cache_write_quant,
    dequantise_kv_ref,
    paged_attention_int8kv,
    quantise_kv_ref,
)
from labkit.attention import attention_ref
from labkit.config import LlamaConfig
from labkit.device import INTERPRETER
from labkit.engine.kv_store import AttentionMetadata, PagedKVStore


class QuantizedKVStore(PagedKVStore):
    """K/V of every layer as 1-byte codes with per-(token, KV head) scales, in blocks; ``dtype`` is the
    model's (what attention computes in and returns)."""

    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int, kv_cache_dtype: str = "int8",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", use_kernels: bool = False):
        if kv_cache_dtype not in KV_FORMATS:
            raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_FORMATS)} for a quantised store, "
                             f"got {kv_cache_dtype!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype is the model's floating-point dtype, got {dtype}")
        L, H, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        if use_kernels and (D < 16 or D & (D - 1)):
            raise ValueError(f"the Triton attention kernels need head_dim a power of two >= 16, this model has {D}; "
                             "use attention_backend='torch'")
        self.config, self.block_size, self.dtype = config, block_size, dtype
        self.device, self.use_kernels = torch.device(device), use_kernels
        self.kv_cache_dtype = kv_cache_dtype
        self.code_dtype = KV_FORMATS[kv_cache_dtype][0]
        code_bytes = block_size * H * D
        self._code_bytes = -(-code_bytes // 4) * 4  # the scales start 4-byte aligned
        scale_bytes = block_size * H * SCALE_DTYPE.itemsize
        row = (L, num_blocks, self._code_bytes + scale_bytes)
        self.k_cache = torch.zeros(row, dtype=torch.uint8, device=self.device)  # one row of bytes per block
        self.v_cache = torch.zeros(row, dtype=torch.uint8, device=self.device)
        self.k_codes, self.k_scale = self._views(self.k_cache)
        self.v_codes, self.v_scale = self._views(self.v_cache)
        self.metadata: AttentionMetadata | None = None

    def _views(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L, nb, _ = rows.shape
        H, D = self.config.num_key_value_heads, self.config.head_dim
        bs = self.block_size
        codes = rows[:, :, :bs * H * D].view(self.code_dtype).view(L, nb, bs, H, D)
        scales = rows[:, :, self._code_bytes:].view(SCALE_DTYPE).view(L, nb, bs, H)
        return codes, scales

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token, every layer, scales included (``labkit.kv_quant.kv_bytes_per_token``)."""
        return self.bytes_per_block // self.block_size

    # ---- the interface the model calls ---------------------------------------------------------
    def attend(self, layer_idx, q, k, v, positions):
        meta = self.metadata
        if meta is None:
            raise RuntimeError("QuantizedKVStore.attend before the runner set its metadata")
        if q.shape[0] != 1:
            raise ValueError(f"the engine packs a step's tokens into one row, got a batch of {q.shape[0]}")
        caches = (self.k_codes[layer_idx], self.v_codes[layer_idx], self.k_scale[layer_idx], self.v_scale[layer_idx])
        k_new = k[0].transpose(0, 1).contiguous()  # (N, Hkv, D) token-major, the model's dtype
        v_new = v[0].transpose(0, 1).contiguous()
        self._write(k_new, v_new, caches, meta.slot_mapping)
        q_t = q[0].transpose(0, 1)  # (N, Hq, D)
        if self.use_kernels and meta.decode_only:
            out = paged_attention_int8kv(q_t.to(self.dtype).contiguous(), *caches, meta.block_tables, meta.seq_lens)
            return out.transpose(0, 1)[None].to(q.dtype)  # (1, Hq, N, D)
        if self.use_kernels:
            return self._attend_prefill_kernel(q_t, caches, meta).transpose(0, 1)[None].to(q.dtype)
        return self._attend_torch_quant(q_t, caches, meta).transpose(0, 1)[None]

    def _write(self, k_new, v_new, caches, slot_mapping) -> None:
        if self.use_kernels and not (self.kv_cache_dtype == "fp8" and INTERPRETER):
            cache_write_quant(k_new, v_new, *caches, slot_mapping)
            return
        # torch: the same codes (quantise_kv_ref is what the kernel is tested against, bit for bit)
        k_codes, v_codes, k_scale, v_scale = caches
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        block, offset = slots // self.block_size, slots % self.block_size
        for x, codes, scales in ((k_new, k_codes, k_scale), (v_new, v_codes, v_scale)):
            c, s = quantise_kv_ref(x[keep], self.kv_cache_dtype)
            codes[block, offset] = c
            scales[block, offset] = s

    def _gather_dequantised(self, caches, meta: AttentionMetadata, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of every block the step's tables name, dequantised: (S, width, block_size, Hkv, D)."""
        k_codes, v_codes, k_scale, v_scale = caches
        blocks = meta.block_tables.long()  # (S, width)
        keys = dequantise_kv_ref(k_codes[blocks], k_scale[blocks]).to(dtype)
        values = dequantise_kv_ref(v_codes[blocks], v_scale[blocks]).to(dtype)
        return keys, values

    def _attend_torch_quant(self, q_t, caches, meta: AttentionMetadata) -> torch.Tensor:
        """PagedKVStore's plain-torch path over the dequantised pool (the CPU path: a pool there is small)."""
        k_codes, v_codes, k_scale, v_scale = caches
        keys = dequantise_kv_ref(k_codes, k_scale).to(q_t.dtype)  # (num_blocks, block_size, Hkv, D)
        values = dequantise_kv_ref(v_codes, v_scale).to(q_t.dtype)
        return self._attend_torch(q_t, keys, values, meta)

    def _attend_prefill_kernel(self, q_t, caches, meta: AttentionMetadata) -> torch.Tensor:
        """GPU, a step with prefill chunks: dequantise the step's blocks into a scratch fp cache (one block per
        table entry, so no host sync to find the distinct ones) and run the fp prefill kernel over it."""
        from kernels.prefill_attention import paged_prefill_attention

        S, width = meta.block_tables.shape
        keys, values = self._gather_dequantised(caches, meta, self.dtype)
        bs, H, D = self.block_size, self.config.num_key_value_heads, self.config.head_dim
        keys, values = keys.reshape(S * width, bs, H, D), values.reshape(S * width, bs, H, D)
        tables = torch.arange(S * width, dtype=torch.int32, device=q_t.device).view(S, width)
        return paged_prefill_attention(q_t.to(self.dtype).contiguous(), keys, values, tables, meta.cu_seqlens_q,
                                       meta.seq_lens)
