"""The cache interface the model's attention goes through, and the two simplest caches.

Every attention layer hands its new queries, keys and values to a cache and gets the attention
output back. The cache decides where K/V live and how attention reads them:

    NoCache          keeps nothing: attention sees only the tokens passed in this call, so generation
                     must re-run the whole sequence every step (notebook 01).
    ContiguousCache  reserves max_len slots per sequence up front, HF/FasterTransformer style
                     (notebook 02); rows of the batch are slots a scheduler hands to requests (03).
    PagedKVStore     (labkit.engine.kv_store) stores K/V in fixed-size blocks read through block tables, the
                     engine's store (04-05); QuantizedKVStore (labkit.engine.kv_store_quant) as 1-byte codes (09).

A new cache only has to implement ``attend``; the model never changes.
"""
from __future__ import annotations

import torch

from labkit.attention import attention_ref
from labkit.config import LlamaConfig


FLOAT_CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_cache_dtype(dtype, cache: str) -> None:
    """A plain cache stores K/V as they are: a dtype without a scale (int8, fp8) would silently destroy them."""
    if dtype not in FLOAT_CACHE_DTYPES:
        raise ValueError(f"{cache} stores K/V unscaled, so its dtype must be one of "
                         f"{[str(d) for d in FLOAT_CACHE_DTYPES]}, got {dtype}; for an int8 or fp8 KV cache use "
                         "the engine's quantised store, EngineConfig(kv_cache_dtype='int8'), which keeps a scale per "
                         "token and head")


class KVCache:
    """Interface: store this step's K/V for ``layer_idx`` and return attention over everything cached."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        """q: (B, Hq, T, D) with RoPE applied; k, v: (B, Hkv, T, D); positions: (B, T) absolute positions
        of the new tokens. Returns (B, Hq, T, D): causal attention of each query over every cached key
        at a position <= its own (the new keys included)."""
        raise NotImplementedError


class NoCache(KVCache):
    """Stores nothing; attention over the tokens of this call only (recompute everything each step)."""

    def attend(self, layer_idx, q, k, v, positions):
        return attention_ref(q, k, v, positions, positions)


def contiguous_write(k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor) -> None:
    """Store new keys and values in one layer's contiguous cache: the token at position p of row b goes to
    ``k_cache[b, :, p]``.

    k_cache, v_cache: (batch_size, Hkv, max_len, D); rows: (B,) cache rows; positions: (B, T); k, v: (B, Hkv, T, D).
    Raises ValueError, writing nothing, when a position does not fit the reservation of max_len slots.
    """
    max_len = k_cache.shape[2]
    if int(positions.max()) >= max_len:
        raise ValueError(
            f"position {int(positions.max())} does not fit: this ContiguousCache reserved max_len={max_len} "
            "slots per sequence. Reserve more, or stop generating earlier."
        )
    B, _, T, _ = k.shape
    r = rows[:, None].expand(B, T)
    # Advanced indices around a slice put the indexed dims first: (B, T, Hkv, D).
    k_cache[r, :, positions] = k.permute(0, 2, 1, 3).to(k_cache.dtype)
    v_cache[r, :, positions] = v.permute(0, 2, 1, 3).to(v_cache.dtype)


def contiguous_read(k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor,
                    span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of positions 0 .. span-1 of each row: (B, Hkv, span, D) each, what attention reads."""
    return k_cache[rows, :, :span], v_cache[rows, :, :span]


class ContiguousCache(KVCache):
    """One contiguous (max_len, D) stretch of K and V per sequence and layer, reserved up front.

    Layout per layer: k[layer]: (batch_size, Hkv, max_len, D). Token at position p of row b lives at
    k[layer][b, :, p]. Rows are independent, so a scheduler can give row b to a new request at any step
    (positions restart at 0; the causal mask hides what the previous owner left behind).
    """

    def __init__(self, config: LlamaConfig, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        max_len = config.max_position_embeddings if max_len is None else max_len
        check_cache_dtype(dtype, "ContiguousCache")
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"batch_size and max_len must be positive, got {batch_size}, {max_len}")
        self.config, self.batch_size, self.max_len = config, batch_size, max_len
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seq_lens = torch.zeros(batch_size, dtype=torch.long)  # tokens held per row (bookkeeping)
        self._rows: torch.Tensor | None = None  # set on a view: batch index -> cache row

    # --- accounting, for the memory notebooks -------------------------------------------------
    @property
    def reserved_bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def used_bytes(self) -> int:
        per_token = self.reserved_bytes // (self.batch_size * self.max_len)
        return int(self.seq_lens.sum()) * per_token

    # --- scheduling ---------------------------------------------------------------------------
    def view(self, rows) -> "ContiguousCache":
        """A cache over a subset of rows (sharing storage): batch index i of the next calls is row rows[i]."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.numel() and (rows.min() < 0 or rows.max() >= self.batch_size):
            raise ValueError(f"rows must lie in [0, {self.batch_size}), got {rows.tolist()}")
        view = object.__new__(ContiguousCache)
        view.__dict__.update(self.__dict__)
        view._rows = rows
        return view

    def reset(self, row: int) -> None:
        """Hand row ``row`` to a new request."""
        self.seq_lens[row] = 0

    # --- the interface ------------------------------------------------------------------------
    def attend(self, layer_idx, q, k, v, positions):
        B, _, T, _ = k.shape
        rows = torch.arange(B) if self._rows is None else self._rows
        if rows.numel() != B:
            raise ValueError(f"batch of {B} sequences but the cache view has {rows.numel()} rows")
        if self._rows is None and B != self.batch_size:
            raise ValueError(f"batch of {B} sequences but the cache holds {self.batch_size}; use cache.view(rows)")
        device = self.k.device
        rows_d, pos_d = rows.to(device), positions.to(device)
        contiguous_write(self.k[layer_idx], self.v[layer_idx], rows_d, pos_d, k, v)
        if layer_idx == self.config.num_hidden_layers - 1:
            self.seq_lens[rows] = torch.maximum(self.seq_lens[rows], positions.max(dim=1).values.cpu() + 1)

        span = int(positions.max()) + 1  # read only as far as the furthest query needs
        keys, values = contiguous_read(self.k[layer_idx], self.v[layer_idx], rows_d, span)  # (B, Hkv, span, D)
        k_pos = torch.arange(span, device=device).expand(B, span)
        return attention_ref(q, keys.to(q.dtype), values.to(q.dtype), pos_d, k_pos)
