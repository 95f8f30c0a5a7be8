"""KV-cache quantisation: what a token costs in bytes, how many sequences a pool then holds, and what it
costs in perplexity, measured on the engine's int8 / fp8 KV store (notebook 09).

    storage   labkit/engine/kv_store_quant.py  QuantizedKVStore: 1-byte codes + one fp32 scale per
                                               (token, KV head), both inside each block
    kernels   kernels/paged_attention_int8kv.py quantise on write; paged decode that dequantises in its loop

Bytes per cached token (K and V, every layer and KV head)::

    fp16:      2 * layers * kv_heads * head_dim * 2
    int8/fp8:  2 * layers * kv_heads * (head_dim * 1 + 4)      # + one fp32 scale per (token, head)

so a fixed memory pool holds about twice as many tokens, hence about twice as many sequences.

Attention always reads the *quantised* cache, also in prefill: the perplexity this cache gives is what
every decode step sees. (vLLM computes prefill attention from the fresh, unquantised K/V and only later
steps read the codes, so its prompt tokens lose a little less.)

``python -m labkit.kv_quant`` prints held-out perplexity with each format.
"""
from __future__ import annotations

import math

import torch

from kernels.paged_attention_int8kv import KV_FORMATS, SCALE_DTYPE, dequantise_kv_ref, quantise_kv_ref
from labkit.attention import attention_ref
from labkit.config import LlamaConfig
from labkit.kv_cache import KVCache
from labkit.paged import blocks_needed

__all__ = ["kv_bytes_per_token", "max_concurrent_sequences", "quantise_kv_ref", "dequantise_kv_ref", "KV_FORMATS",
           "RecordingCache", "make_store", "store_logits", "heldout_perplexities", "teacher_forced_agreement"]

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


class RecordingCache(KVCache):
    """Stateless like NoCache, but keeps each layer's new K and V (B, Hkv, T, D) for inspection."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def attend(self, layer_idx, q, k, v, positions):
        self.k[layer_idx], self.v[layer_idx] = k.detach(), v.detach()
        return attention_ref(q, k, v, positions, positions)


# --- the engine's store, driven directly: teacher-forced logits --------------------------------------
def make_store(config: LlamaConfig, num_blocks: int, block_size: int = 16, kv_cache_dtype: str = "int8",
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The KV store the engine's ModelRunner builds for ``EngineConfig(kv_cache_dtype=...)`` ("auto": fp)."""
    from labkit.engine.kv_store import PagedKVStore
    from labkit.engine.kv_store_quant import QuantizedKVStore

    use_kernels = torch.device(device).type == "cuda"
    if kv_cache_dtype == "auto":
        return PagedKVStore(config, num_blocks, block_size, dtype=dtype, device=device, use_kernels=use_kernels)
    return QuantizedKVStore(config, num_blocks, block_size, kv_cache_dtype, dtype=dtype, device=device,
                            use_kernels=use_kernels)


@torch.no_grad()
def store_logits(model, store, x: torch.Tensor) -> torch.Tensor:
    """Logits (S, T, vocab) of S sequences x (S, T), prefilled in one packed step through ``store``: the
    metadata the engine's runner builds (slot mapping, block tables, lengths), every position scored.
    Sequence i takes blocks [i * n, (i + 1) * n) of the store (n = blocks for T tokens)."""
    from labkit.engine.kv_store import AttentionMetadata

    S, T = x.shape
    bs = store.block_size
    n = blocks_needed(T, bs)
    if S * n > store.k_cache.shape[1]:
        raise ValueError(f"{S} sequences of {T} tokens need {S * n} blocks; the store has {store.k_cache.shape[1]}")
    tables = [list(range(i * n, (i + 1) * n)) for i in range(S)]
    slots = [t[p // bs] * bs + p % bs for t in tables for p in range(T)]
    store.metadata = AttentionMetadata.build([T] * S, [T] * S, tables, slots, store.device,
                                             with_torch_path=not store.use_kernels)
    device = next(model.parameters()).device
    ids = x.reshape(1, S * T).to(device)
    positions = torch.arange(T, device=device).repeat(S)[None]
    return model(ids, positions, cache=store, validate=False).view(S, T, -1)


@torch.no_grad()
def heldout_perplexities(model, ids: torch.Tensor, formats=("none", "int8", "fp8"), block_size: int = 16,
                         batch_size: int = 8) -> dict[str, float]:
    """Held-out perplexity of ``model`` on the token stream ``ids`` (``labkit.evaluate``'s windows of the
    model's context), attention reading K/V from the engine's store of each format: "none" = no cache (the
    fp32 reference), "auto" = the engine's fp store, "int8", "fp8"."""
    import torch.nn.functional as F

    from labkit.evaluate import mean_loss, windows

    ctx = model.config.max_position_embeddings
    device = next(model.parameters()).device
    pieces = windows(ids, ctx)
    out = {}
    for fmt in formats:
        if fmt == "none":
            loss, _ = mean_loss(model, ids, ctx, batch_size)
            out[fmt] = math.exp(loss)
            continue
        store = make_store(model.config, batch_size * blocks_needed(ctx, block_size), block_size, fmt, device=device)
        total, count = 0.0, 0
        for start in range(0, len(pieces), batch_size):
            by_len: dict[int, list] = {}  # only the last window can be shorter
            for x, y in pieces[start:start + batch_size]:
                by_len.setdefault(len(x), []).append((x, y))
            for same in by_len.values():
                x = torch.stack([p[0] for p in same])
                y = torch.stack([p[1] for p in same]).to(device)
                logits = store_logits(model, store, x)
                total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
                count += y.numel()
        out[fmt] = math.exp(total / count)
    return out


@torch.no_grad()
def teacher_forced_agreement(model, x: torch.Tensor, kv_cache_dtype: str, block_size: int = 16) -> float:
    """Share of positions of x (S, T) whose greedy next token with a ``kv_cache_dtype`` store equals the
    one without a cache (teacher forcing: every position sees the true text, so one difference does not
    derail the rest the way free-running greedy decoding does)."""
    S, T = x.shape
    store = make_store(model.config, S * blocks_needed(T, block_size), block_size, kv_cache_dtype,
                       device=next(model.parameters()).device)
    quant = store_logits(model, store, x).argmax(-1)
    full = model(x.to(quant.device)).argmax(-1)
    return float((quant == full).float().mean())


def main(argv: list[str] | None = None) -> None:
    """``python -m labkit.kv_quant``: held-out perplexity of the shipped model with int8 / fp8 KV stores."""
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
    ppl = heldout_perplexities(model, ids, formats=("none", "auto", "int8", "fp8"))
    base = ppl["none"]
    names = {"none": "no cache", "auto": "fp32 store"}
    for fmt, p in ppl.items():
        nbytes = kv_bytes_per_token(model.config, "fp32" if fmt in ("none", "auto") else fmt)
        print(f"{names.get(fmt, fmt + ' store'):10s}: held-out perplexity {p:.4f} ({100 * (p / base - 1):+.3f}%), "
              f"{nbytes} bytes/token over {len(ids) - 1:,} tokens")


if __name__ == "__main__":
    main()
