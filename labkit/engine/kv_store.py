"""The paged KV store the engine's model runner drives: K/V in blocks, read through per-step metadata.

    k_cache[layer]: (num_blocks, block_size, num_kv_heads, head_dim)    (vLLM's layout; v_cache the same)

The runner packs every scheduled sequence's new tokens into one row ``(1, num_tokens)`` and sets
:class:`AttentionMetadata` *before* the forward; each layer's ``attend`` then only writes the new K/V
at ``slot_mapping`` and reads through ``block_tables``. Nothing here allocates a block or reads a value
back to the host, so a decode step can be captured in a CUDA graph.

    decode-only step (one query per sequence)  kernels/paged_attention.py        (Triton, GPU)
    anything else (prefill chunks + decodes)   kernels/prefill_attention.py      (Triton, GPU)
    CPU                                        gather the blocks, plain-torch attention (labkit.attention)
    batch_invariant=True, every step           labkit.batch_invariant.paged_attention (fixed KV tiles from 0)
"""
from __future__ import annotations

import dataclasses

import torch

from kernels.cache_write import cache_write, cache_write_ref
from labkit.attention import attention_ref
from labkit.config import LlamaConfig
from labkit.kv_cache import KVCache, check_cache_dtype


@dataclasses.dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each query reads. Built on the host before the forward."""

    slot_mapping: torch.Tensor  # (num_tokens,) int64: cache slot of each new token (-1: padding, skip)
    block_tables: torch.Tensor  # (num_seqs, max_blocks) int32
    seq_lens: torch.Tensor  # (num_seqs,) int32: tokens in the cache after this step
    cu_seqlens_q: torch.Tensor  # (num_seqs + 1,) int32: packed query rows of each sequence
    max_query_len: int  # a host int, so no kernel launch has to read it back
    decode_only: bool
    # plain-torch path: the decodes and the prefills as two padded batches (see TorchGroup)
    torch_groups: list["TorchGroup"] | None = None

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], slots: list[int],
              device, with_torch_path: bool) -> "AttentionMetadata":
        width = max(1, max(len(t) for t in block_tables))
        tables = torch.zeros(len(block_tables), width, dtype=torch.int32)  # entries past a row's blocks: unread
        for i, t in enumerate(block_tables):
            tables[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        q_lens = torch.tensor(query_lens, dtype=torch.int32)
        cu = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(q_lens, 0)
        max_q = max(query_lens)
        meta = cls(torch.tensor(slots, dtype=torch.int64), tables, torch.tensor(seq_lens, dtype=torch.int32), cu,
                   max_q, max_q == 1)
        if with_torch_path:
            # Decodes and prefills apart: padded together, every decode would pay for the longest prefill's
            # query rows (a step of 63 decodes and one 48-token prompt would cost like 64 prompts).
            decode = [i for i, n in enumerate(query_lens) if n == 1]
            prefill = [i for i, n in enumerate(query_lens) if n > 1]
            meta.torch_groups = [TorchGroup.build(g, query_lens, seq_lens, block_tables, cu)
                                 for g in (decode, prefill) if g]
        return meta.to(device)

    def to(self, device) -> "AttentionMetadata":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        groups = None if self.torch_groups is None else [g.to(device) for g in self.torch_groups]
        return dataclasses.replace(self, slot_mapping=move(self.slot_mapping), block_tables=move(self.block_tables),
                                   seq_lens=move(self.seq_lens), cu_seqlens_q=move(self.cu_seqlens_q),
                                   torch_groups=groups)


@dataclasses.dataclass
class TorchGroup:
    """Some of a step's sequences as one padded batch for plain-torch attention."""

    block_tables: torch.Tensor  # (S, width) int64: only these sequences, width = their most blocks
    seq_lens: torch.Tensor  # (S,) int64
    q_index: torch.Tensor  # (S, max_q) int64 into the packed tokens
    q_valid: torch.Tensor  # (S, max_q) bool
    q_pos: torch.Tensor  # (S, max_q) int64 positions
    out_index: torch.Tensor  # (valid rows,) int64: where each valid row goes in the packed output

    @classmethod
    def build(cls, seqs: list[int], query_lens, seq_lens, block_tables, cu) -> "TorchGroup":
        width = max(1, max(len(block_tables[i]) for i in seqs))
        tables = torch.zeros(len(seqs), width, dtype=torch.int64)
        for r, i in enumerate(seqs):
            tables[r, :len(block_tables[i])] = torch.tensor(block_tables[i], dtype=torch.int64)
        q_lens = torch.tensor([query_lens[i] for i in seqs], dtype=torch.int64)
        lens = torch.tensor([seq_lens[i] for i in seqs], dtype=torch.int64)
        rows = torch.arange(int(q_lens.max()))
        valid = rows[None, :] < q_lens[:, None]  # (S, max_q)
        first = cu[torch.tensor(seqs)].long()  # packed row of each sequence's first new token
        index = torch.where(valid, first[:, None] + rows[None, :], 0)
        pos = torch.where(valid, (lens - q_lens)[:, None] + rows[None, :], 0)
        return cls(tables, lens, index, valid, pos, index[valid])

    def to(self, device) -> "TorchGroup":
        return TorchGroup(*(getattr(self, f.name).to(device, non_blocking=True) for f in dataclasses.fields(self)))


class PagedKVStore(KVCache):
    """K/V of every layer in blocks; ``metadata`` is set by the runner before each forward."""

    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", use_kernels: bool = False, batch_invariant: bool = False):
        check_cache_dtype(dtype, "PagedKVStore")  # int8 / fp8 without scales would destroy K/V
        D = config.head_dim
        if use_kernels and (D < 16 or D & (D - 1)):
            raise ValueError(f"the Triton attention kernels need head_dim a power of two >= 16, this model has {D}; "
                             "use attention_backend='torch'")
        self.config, self.block_size, self.dtype = config, block_size, dtype
        self.device, self.use_kernels = torch.device(device), use_kernels
        self.batch_invariant = batch_invariant
        shape = (config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, D)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.metadata: AttentionMetadata | None = None

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block, every layer."""
        return 2 * self.k_cache[:, 0].numel() * self.k_cache.element_size()

    # ---- block moves (before the forward) ------------------------------------------------------
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block dst gets block src's K/V (every layer)."""
        if pairs:
            src = torch.tensor([s for s, _ in pairs], device=self.device)
            dst = torch.tensor([d for _, d in pairs], device=self.device)
            self.k_cache[:, dst] = self.k_cache[:, src]
            self.v_cache[:, dst] = self.v_cache[:, src]

    def swap_out(self, pairs: list[tuple[int, int]], cpu_k: torch.Tensor, cpu_v: torch.Tensor) -> None:
        """Device blocks -> swap space (pairs of (device, cpu) block ids)."""
        if pairs:
            dev = torch.tensor([d for d, _ in pairs], device=self.device)
            cpu = torch.tensor([c for _, c in pairs])
            cpu_k[:, cpu] = self.k_cache[:, dev].cpu()
            cpu_v[:, cpu] = self.v_cache[:, dev].cpu()

    def swap_in(self, pairs: list[tuple[int, int]], cpu_k: torch.Tensor, cpu_v: torch.Tensor) -> None:
        """Swap space -> device blocks (pairs of (cpu, device) block ids)."""
        if pairs:
            cpu = torch.tensor([c for c, _ in pairs])
            dev = torch.tensor([d for _, d in pairs], device=self.device)
            self.k_cache[:, dev] = cpu_k[:, cpu].to(self.device, non_blocking=True)
            self.v_cache[:, dev] = cpu_v[:, cpu].to(self.device, non_blocking=True)

    # ---- the interface the model calls ---------------------------------------------------------
    def attend(self, layer_idx, q, k, v, positions):
        meta = self.metadata
        if meta is None:
            raise RuntimeError("PagedKVStore.attend before the runner set its metadata")
        if q.shape[0] != 1:
            raise ValueError(f"the engine packs a step's tokens into one row, got a batch of {q.shape[0]}")
        k_cache, v_cache = self.k_cache[layer_idx], self.v_cache[layer_idx]
        k_new = k[0].transpose(0, 1).to(self.dtype)  # (N, Hkv, D) token-major
        v_new = v[0].transpose(0, 1).to(self.dtype)
        (cache_write if self.use_kernels else cache_write_ref)(k_new, v_new, k_cache, v_cache, meta.slot_mapping)
        q_t = q[0].transpose(0, 1)  # (N, Hq, D)
        if self.batch_invariant:  # one kernel for decode and mixed steps alike: the same tiles for every query
            from labkit.batch_invariant import paged_attention

            out = paged_attention(q_t.to(self.dtype).contiguous(), k_cache, v_cache, meta.block_tables,
                                  meta.cu_seqlens_q, meta.seq_lens, meta.max_query_len, self.use_kernels)
            return out.transpose(0, 1)[None].to(q.dtype)  # (1, Hq, N, D)
        if self.use_kernels:
            q_t = q_t.to(self.dtype).contiguous()
            if meta.decode_only:
                from kernels.paged_attention import paged_attention

                out = paged_attention(q_t, k_cache, v_cache, meta.block_tables, meta.seq_lens)
            else:
                from kernels.prefill_attention import paged_prefill_attention

                out = paged_prefill_attention(q_t, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q,
                                              meta.seq_lens, check=False)
            return out.transpose(0, 1)[None].to(q.dtype)  # (1, Hq, N, D)
        return self._attend_torch(q_t, k_cache, v_cache, meta).transpose(0, 1)[None]

    def _attend_torch(self, q_t, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """Per group (decodes, prefills): gather each sequence's blocks, plain torch; rows go back to their
        packed places. Prefills pad their queries into (S, Hq, max_q, D) for attention_ref."""
        out = torch.empty_like(q_t)  # (N, Hq, D)
        for g in meta.torch_groups:
            S, width = g.block_tables.shape
            span = width * self.block_size
            k_pos = torch.arange(span, device=q_t.device).expand(S, span)
            k_valid = k_pos < g.seq_lens[:, None]
            keys = k_cache[g.block_tables].view(S, span, *k_cache.shape[2:])  # (S, span, Hkv, D)
            values = v_cache[g.block_tables].view(S, span, *v_cache.shape[2:])
            if g.q_index.shape[1] == 1:  # decodes: one query each
                out[g.out_index] = _decode_attention(q_t[g.q_index[:, 0]], keys, values, k_valid)
                continue
            keys = keys.transpose(1, 2).to(q_t.dtype)  # (S, Hkv, span, D)
            values = values.transpose(1, 2).to(q_t.dtype)
            q_pad = q_t[g.q_index].transpose(1, 2)  # (S, Hq, max_q, D)
            o = attention_ref(q_pad, keys, values, g.q_pos, k_pos, k_valid)  # (S, Hq, max_q, D)
            out[g.out_index] = o.transpose(1, 2)[g.q_valid]  # valid rows, back in packed order
        return out


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_valid: torch.Tensor) -> torch.Tensor:
    """One query per sequence, grouped-query attention read straight from the gathered blocks.

    q: (S, Hq, D); k, v: (S, span, Hkv, D) as the blocks lie; k_valid: (S, span). The Hq // Hkv query heads
    of a group are stacked against their one KV head, so K and V are read once and never transposed
    (attention_ref repeats them per query head, which on the CPU costs more than the attention itself).
    Slots past a sequence's length may hold anything, even NaN: their scores are set to -inf and their
    values to 0, so they add exactly nothing.
    """
    S, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(S, Hkv, Hq // Hkv, D).float()  # (S, Hkv, G, D)
    scores = torch.einsum("shgd,sthd->shgt", qg, k.float()) * D ** -0.5  # (S, Hkv, G, span)
    scores = scores.masked_fill(~k_valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    values = torch.where(k_valid[:, :, None, None], v.float(), 0.0)
    return torch.einsum("shgt,sthd->shgd", probs, values).reshape(S, Hq, D).to(q.dtype)  # (S, Hq, D)
