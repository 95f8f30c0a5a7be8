"""PagedCache: the KV cache in fixed-size blocks, read through block tables (notebooks 04-05).

    bookkeeping (layer 0 of each forward):  labkit.paged.BlockManager gives each new token a slot
    write (every layer, every new token):   kernels/cache_write.py         k_cache[slot] = k
    read  (decode, one new token a row):    kernels/paged_attention.py     over block_tables, seq_lens
    read  (prefill, several tokens a row):  gather the blocks, plain-torch causal attention

Storage per layer: ``k_cache[layer]`` is (num_blocks, block_size, num_kv_heads, head_dim), the layout
vLLM's kernels read, and so is ``v_cache[layer]``. Batch row ``b`` is sequence ``b`` of the block
manager, or ``seq_ids[b]`` on a ``cache.view(seq_ids)``. A sequence's positions must continue where it
stopped (append), or restart at 0 (the id is handed to a new sequence, as with ContiguousCache rows).
"""
from __future__ import annotations

import torch

from kernels.cache_write import cache_write, cache_write_ref
from kernels.paged_attention import paged_attention
from labkit.attention import attention_ref
from labkit.config import LlamaConfig
from labkit.device import MODE
from labkit.kv_cache import KVCache, check_cache_dtype
from labkit.paged import BlockManager, blocks_needed

__all__ = ["PagedCache"]


class PagedCache(KVCache):
    """Paged KV cache over a :class:`labkit.paged.BlockManager`.

    backend: "auto" runs the Triton kernels on the GPU and plain torch on the CPU; "triton" forces the
    kernels (on the CPU through Triton's interpreter: slow, tiny models only); "torch" forces the
    plain-torch references (the cache layout and the block bookkeeping stay the same).
    """

    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", backend: str = "auto"):
        check_cache_dtype(dtype, "PagedCache")
        self._setup(config, num_blocks, block_size, device, backend)
        self.dtype = dtype
        shape = (config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)

    def _setup(self, config: LlamaConfig, num_blocks: int, block_size: int, device, backend: str) -> None:
        """What every paged cache shares: the backend choice and the block bookkeeping (storage is the subclass's)."""
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
        self.device = torch.device(device)
        self.use_kernels = backend == "triton" or (backend == "auto" and MODE == "gpu" and self.device.type == "cuda")
        D = config.head_dim
        if self.use_kernels and (D < 16 or D & (D - 1)):
            raise ValueError(
                f"the paged-attention kernel needs head_dim to be a power of two >= 16, this model has {D}; "
                "use backend='torch'."
            )
        self.config, self.block_size = config, block_size
        self.block_manager = BlockManager(num_blocks, block_size)
        self._step = None  # (slot_mapping, block_tables, seq_lens) of the current forward, set at layer 0
        self._seq_ids: list[int] | None = None  # set on a view: batch index -> sequence id

    def view(self, seq_ids) -> "PagedCache":
        """A cache over some sequences (sharing storage and blocks): batch row i of the next calls is seq_ids[i]."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._seq_ids, view._step = [int(s) for s in seq_ids], None
        return view

    @classmethod
    def for_batch(cls, config: LlamaConfig, batch_size: int, max_len: int | None = None, **kwargs) -> "PagedCache":
        """Enough blocks for ``batch_size`` sequences of up to ``max_len`` tokens (default: the model's context)."""
        max_len = config.max_position_embeddings if max_len is None else max_len
        block_size = kwargs.get("block_size", 16)
        return cls(config, num_blocks=batch_size * blocks_needed(max_len, block_size), **kwargs)

    # --- accounting ---------------------------------------------------------------------------
    @property
    def reserved_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    @property
    def used_bytes(self) -> int:
        """Bytes of the token slots that hold a live token (shared blocks counted once)."""
        per_token = self.reserved_bytes // (self.block_manager.num_blocks * self.block_size)
        return self.block_manager.num_used_slots() * per_token

    def free(self, seq_id: int) -> None:
        """Release a finished sequence's blocks."""
        self.block_manager.free(seq_id)

    def _copy_block(self, src: int, dst: int) -> None:
        """Copy one physical block (every layer) for copy-on-write."""
        self.k_cache[:, dst] = self.k_cache[:, src]
        self.v_cache[:, dst] = self.v_cache[:, src]

    # --- the interface ------------------------------------------------------------------------
    def _prepare(self, positions: torch.Tensor) -> None:
        """Layer 0 of each forward: slots for the new tokens, then block tables and lengths for the read."""
        bm = self.block_manager
        B, T = positions.shape
        ids = list(range(B)) if self._seq_ids is None else self._seq_ids
        if len(ids) != B:
            raise ValueError(f"batch of {B} rows but this cache view has {len(ids)} sequences")
        pos = positions.cpu()
        slots = []
        for b, sid in enumerate(ids):
            if sid in bm.seqs and int(pos[b, 0]) == 0:
                bm.free(sid)  # the id starts a new sequence
            have = bm.num_tokens(sid) if sid in bm.seqs else 0
            if not torch.equal(pos[b], torch.arange(have, have + T)):
                raise ValueError(
                    f"row {b}: positions {pos[b].tolist()[:4]}... but the cache holds {have} tokens of sequence {sid}; "
                    f"a {type(self).__name__} only appends: positions must continue from the cached length (or restart at 0)."
                )
            if sid not in bm.seqs:
                bm.allocate(sid, T)
                slots += bm.slot_mapping(sid, 0, T)
            else:
                slots += bm.append_slots(sid, T)
        for src, dst in bm.take_copies():  # copy-on-write of shared blocks, before anything is written
            self._copy_block(src, dst)
        lens = [bm.num_tokens(sid) for sid in ids]
        width = max(blocks_needed(n, self.block_size) for n in lens)
        tables = torch.zeros(B, width, dtype=torch.int32)  # entries past a row's blocks are never read
        for b, sid in enumerate(ids):
            table = bm.block_table(sid)
            tables[b, : len(table)] = torch.tensor(table, dtype=torch.int32)
        self._step = (torch.tensor(slots, dtype=torch.int64, device=self.device), tables.to(self.device),
                      torch.tensor(lens, dtype=torch.int32, device=self.device))

    def attend(self, layer_idx, q, k, v, positions):
        B, Hkv, T, D = k.shape
        if layer_idx == 0:
            self._prepare(positions)
        slot_mapping, block_tables, seq_lens = self._step
        k_cache, v_cache = self.k_cache[layer_idx], self.v_cache[layer_idx]
        k_new = k.transpose(1, 2).reshape(B * T, Hkv, D).to(self.dtype)  # (B*T, Hkv, D), token-major
        v_new = v.transpose(1, 2).reshape(B * T, Hkv, D).to(self.dtype)
        (cache_write if self.use_kernels else cache_write_ref)(k_new, v_new, k_cache, v_cache, slot_mapping)

        if T == 1 and self.use_kernels:  # decode: one query a row, the paged kernel reads the blocks
            out = paged_attention(q[:, :, 0].to(self.dtype), k_cache, v_cache, block_tables, seq_lens)  # (B, Hq, D)
            return out[:, :, None].to(q.dtype)  # (B, Hq, 1, D)
        return self._attend_gathered(q, positions, k_cache, v_cache, block_tables, seq_lens)

    def _attend_gathered(self, q, positions, k_cache, v_cache, block_tables, seq_lens):
        """Prefill (and the CPU path): gather each row's blocks into (B, Hkv, span, D), then plain torch."""
        B = q.shape[0]
        blocks = block_tables.long()  # (B, width)
        span = blocks.shape[1] * self.block_size
        keys = k_cache[blocks].flatten(1, 2).transpose(1, 2).to(q.dtype)  # (B, Hkv, span, D)
        values = v_cache[blocks].flatten(1, 2).transpose(1, 2).to(q.dtype)
        k_pos = torch.arange(span, device=q.device).expand(B, span)
        k_valid = k_pos < seq_lens.to(q.device).long()[:, None]
        return attention_ref(q, keys, values, positions.to(q.device), k_pos, k_valid)
