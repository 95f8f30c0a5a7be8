"""KV-cache quantisation: a paged cache that stores int8 (or fp8 e4m3) K/V plus one scale per (token, KV head).

    write (every layer, every new token):   codes, scale = quantise(k)     # kernels/paged_attention_int8kv.py
                                             k_cache[slot] = codes;  k_scale[slot] = scale
    read  (decode, one new token a sequence): paged decode kernel that dequantises inside the loop
    read  (prefill, or on the CPU):          gather the blocks, codes * scale, plain-torch attention

Bytes per cached token (K and V, every layer and KV head)::

    fp16:      2 * layers * kv_heads * head_dim * 2
    int8/fp8:  2 * layers * kv_heads * (head_dim * 1 + 4)      # + one fp32 scale per (token, head)

so a fixed memory pool holds about twice as many tokens, hence about twice as many sequences.

Attention always reads the *quantised* cache, also in prefill: the perplexity this cache gives is what
every decode step sees. (vLLM computes prefill attention from the fresh, unquantised K/V and only later
steps read the codes, so its prompt tokens lose a little less.)

Block bookkeeping is :class:`labkit.paged_cache.PagedCache`'s (a :class:`labkit.paged.BlockManager` underneath).
"""
from __future__ import annotations

import torch

from kernels.paged_attention_int8kv import (
    KV_FORMATS,
    SCALE_DTYPE,
    cache_write_quant,
    cache_write_quant_ref,
    dequantise_kv_ref,
    paged_attention_int8kv,
    quantise_kv_ref,
)
from labkit.attention import attention_ref
from labkit.config import LlamaConfig
from labkit.kv_cache import KVCache
from labkit.paged import blocks_needed
from labkit.paged_cache import PagedCache

__all__ = ["QuantizedPagedCache", "kv_bytes_per_token", "max_concurrent_sequences", "quantise_kv_ref",
           "dequantise_kv_ref", "KV_FORMATS", "RecordingCache"]

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def kv_bytes_per_token(config: LlamaConfig, kv_format: str = "int8") -> int:
    """Bytes one cached token costs, K and V, every layer, scales included.

    kv_format: "fp32", "fp16", "bf16" (no scales) or "int8", "fp8" (1 byte a value + a 4-byte scale
    per KV head, for K and for V).
    """
    L, H, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    if kv_format in DTYPE_BYTES:
        return 2 * L * H * D * DTYPE_BYTES[kv_format]
    if kv_format in KV_FORMATS:
        return 2 * L * H * (D * 1 + SCALE_DTYPE.itemsize)
    raise ValueError(f"kv_format must be one of {sorted(DTYPE_BYTES) + sorted(KV_FORMATS)}, got {kv_format!r}")


def max_concurrent_sequences(config: LlamaConfig, pool_bytes: int, seq_len: int, kv_format: str = "int8",
                             block_size: int = 16) -> int:
    """How many sequences of ``seq_len`` tokens fit at once in a paged pool of ``pool_bytes``."""
    block_bytes = kv_bytes_per_token(config, kv_format) * block_size
    num_blocks = pool_bytes // block_bytes
    return num_blocks // blocks_needed(seq_len, block_size)


class QuantizedPagedCache(PagedCache):
    """Paged KV cache with 1-byte codes and fp32 scales per (token, KV head).

    Storage per layer: ``k_cache[layer]`` (num_blocks, block_size, num_kv_heads, head_dim) int8/fp8 and
    ``k_scale[layer]`` (num_blocks, block_size, num_kv_heads) fp32; the same for V. The block bookkeeping
    (block manager, slot mapping, block tables, views, copy-on-write) is PagedCache's.

    backend: "auto" uses the Triton kernels on the GPU and plain torch on the CPU; "triton" forces the
    kernels (in the interpreter on the CPU: slow, tiny models only); "torch" forces the references.
    """

    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int = 16, kv_format: str = "int8",
                 device: torch.device | str = "cpu", backend: str = "auto"):
        if kv_format not in KV_FORMATS:
            raise ValueError(f"kv_format must be one of {sorted(KV_FORMATS)}, got {kv_format!r}")
        self._setup(config, num_blocks, block_size, device, backend)
        self.kv_format = kv_format
        L, H, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        codes = (L, num_blocks, block_size, H, D)
        qdtype = KV_FORMATS[kv_format][0]
        self.dtype = qdtype
        self.k_cache = torch.zeros(codes, dtype=qdtype, device=self.device)
        self.v_cache = torch.zeros(codes, dtype=qdtype, device=self.device)
        self.k_scale = torch.zeros(codes[:-1], dtype=SCALE_DTYPE, device=self.device)
        self.v_scale = torch.zeros(codes[:-1], dtype=SCALE_DTYPE, device=self.device)

    # --- accounting ---------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.config, self.kv_format)

    @property
    def reserved_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k_cache, self.v_cache, self.k_scale, self.v_scale))

    def _copy_block(self, src: int, dst: int) -> None:
        super()._copy_block(src, dst)
        self.k_scale[:, dst] = self.k_scale[:, src]
        self.v_scale[:, dst] = self.v_scale[:, src]

    # --- the interface ------------------------------------------------------------------------
    def attend(self, layer_idx, q, k, v, positions):
        B, Hkv, T, D = k.shape
        if layer_idx == 0:
            self._prepare(positions)
        slot_mapping, block_tables, seq_lens = self._step
        caches = (self.k_cache[layer_idx], self.v_cache[layer_idx], self.k_scale[layer_idx], self.v_scale[layer_idx])
        k_new = k.permute(0, 2, 1, 3).reshape(B * T, Hkv, D).contiguous()  # (B*T, Hkv, D), token-major
        v_new = v.permute(0, 2, 1, 3).reshape(B * T, Hkv, D).contiguous()
        write = cache_write_quant if self.use_kernels else cache_write_quant_ref
        write(k_new, v_new, *caches, slot_mapping)

        if T == 1 and self.use_kernels:  # decode: the kernel dequantises inside its loop
            out = paged_attention_int8kv(q[:, :, 0].contiguous(), *caches, block_tables, seq_lens)  # (B, Hq, D)
            return out[:, :, None]
        return self._attend_dequantised(q, positions, caches, block_tables, seq_lens)

    def _attend_dequantised(self, q, positions, caches, block_tables, seq_lens):
        """Gather every row's blocks, dequantise, plain-torch causal attention."""
        k_cache, v_cache, k_scale, v_scale = caches
        B = q.shape[0]
        blocks = block_tables.long()  # (B, width)
        span = blocks.shape[1] * self.block_size

        def gather(codes, scale):  # -> (B, Hkv, span, D)
            c = codes[blocks].flatten(1, 2)  # (B, span, Hkv, D)
            s = scale[blocks].flatten(1, 2)  # (B, span, Hkv)
            return dequantise_kv_ref(c, s).permute(0, 2, 1, 3).to(q.dtype)

        keys, values = gather(k_cache, k_scale), gather(v_cache, v_scale)
        k_pos = torch.arange(span, device=q.device).expand(B, span)
        k_valid = k_pos < seq_lens.to(q.device).long()[:, None]
        return attention_ref(q, keys, values, positions.to(q.device), k_pos, k_valid)


class RecordingCache(KVCache):
    """Stateless like NoCache, but keeps each layer's new K and V (B, Hkv, T, D) for inspection."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def attend(self, layer_idx, q, k, v, positions):
        self.k[layer_idx], self.v[layer_idx] = k.detach(), v.detach()
        return attention_ref(q, k, v, positions, positions)


# --- quality: held-out perplexity with each cache format ------------------------------------------
def heldout_perplexities(model, ids: torch.Tensor, formats=("none", "int8", "fp8"), block_size: int = 16,
                         batch_size: int = 8) -> dict[str, float]:
    """Held-out perplexity of ``model`` on the token stream ``ids`` (``labkit.evaluate.mean_loss``'s windows),
    attention reading K/V from a cache of each format: "none" = no cache (full precision), "int8", "fp8"."""
    import math

    from labkit.evaluate import mean_loss

    ctx = model.config.max_position_embeddings
    device = next(model.parameters()).device
    out = {}
    for fmt in formats:
        factory = None if fmt == "none" else (
            lambda fmt=fmt: QuantizedPagedCache.for_batch(model.config, batch_size, ctx, block_size=block_size,
                                                          kv_format=fmt, device=device))
        loss, _ = mean_loss(model, ids, ctx, batch_size, cache_factory=factory)
        out[fmt] = math.exp(loss)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m labkit.kv_quant``: held-out perplexity of the shipped model with int8 / fp8 KV caches."""
    import argparse

    from labkit.checkpoint import load_default_model
    from labkit.evaluate import CARD_MAX_TOKENS, encode_split

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--max-tokens", type=int, default=CARD_MAX_TOKENS)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        from labkit.evaluate import usage_error

        usage_error(parser, f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    model, tokenizer = load_default_model(device=args.device)
    ids = encode_split(tokenizer)[:args.max_tokens + 1]
    ppl = heldout_perplexities(model, ids)
    base = ppl["none"]
    for fmt, p in ppl.items():
        print(f"{fmt:5s} KV cache: held-out perplexity {p:.4f} ({100 * (p / base - 1):+.3f}%), "
              f"{kv_bytes_per_token(model.config, 'fp32' if fmt == 'none' else fmt)} bytes/token "
              f"over {len(ids) - 1:,} tokens")


if __name__ == "__main__":
    main()
