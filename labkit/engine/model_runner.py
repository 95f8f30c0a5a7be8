"""The model runner: one batched forward per step through the paged KV store, then sampling.

    execute(scheduler_output):
        move blocks      swap out -> swap in -> copy-on-write          (before anything is written)
        metadata         input ids, positions, slot mapping, block tables, lengths   (host, then one copy)
        forward          model(ids (1, N), positions (1, N), cache=store, logits_indices)
                         decode-only steps on a GPU replay a CUDA graph captured for the batch-size bucket
        sample           one row of logits per sequence that is level with its tokens

With ``EngineConfig(fused_ops=True)`` the runner fuses the model in place first (labkit.fused_ops.fuse_model;
a model fused already is used as it is).
With ``EngineConfig(batch_invariant=True)`` every forward (and every graph capture) runs inside
``labkit.batch_invariant.batch_invariant_mode(model)`` and the store attends batch-invariantly.

Every scheduled sequence's new tokens are packed into one row of ``N`` tokens (prefill chunks and decodes
together); ``logits_indices`` picks the last token of each sequence that samples, so the LM head runs
on those rows only.
"""
from __future__ import annotations

import contextlib
import time

import torch

from labkit.batch_invariant import batch_invariant_mode
from labkit.engine.config import EngineConfig
from labkit.engine.kv_store import AttentionMetadata, PagedKVStore
from labkit.engine.scheduler import SchedulerOutput
from labkit.paged import blocks_needed
from labkit.sampling import sample

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class ModelRunner:
    def __init__(self, model, config: EngineConfig, max_model_len: int):
        if config.fused_ops:
            from labkit.fused_ops import fuse_model, is_fused

            if not is_fused(model):
                fuse_model(model)
        p = next(model.parameters())
        self.model, self.config, self.max_model_len = model, config, max_model_len
        self.device, self.dtype = p.device, p.dtype
        on_gpu = self.device.type == "cuda"
        backend = config.attention_backend
        use_kernels = backend == "triton" or (backend == "auto" and on_gpu)
        if config.kv_cache_dtype != "auto":
            from labkit.engine.kv_store_quant import QuantizedKVStore

            self.store = QuantizedKVStore(model.config, config.num_blocks, config.block_size, config.kv_cache_dtype,
                                          dtype=self.dtype, device=self.device, use_kernels=use_kernels)
        else:
            self.store = PagedKVStore(model.config, config.num_blocks, config.block_size, dtype=self.dtype,
                                      device=self.device, use_kernels=use_kernels,
                                      batch_invariant=config.batch_invariant)
        self.cpu_k = self.cpu_v = None
        if config.num_cpu_blocks:
            shape = (self.store.k_cache.shape[0], config.num_cpu_blocks) + tuple(self.store.k_cache.shape[2:])
            self.cpu_k = torch.zeros(shape, dtype=self.store.k_cache.dtype, pin_memory=on_gpu)
            self.cpu_v = torch.zeros_like(self.cpu_k, pin_memory=on_gpu)
        self.use_graphs = on_gpu and not config.enforce_eager
        self.max_blocks_per_seq = blocks_needed(max_model_len, config.block_size)
        self._graphs: dict[int, tuple] = {}
        self._graph_pool = None
        self.last_step_seconds = 0.0
        self.on_logits = None  # f(seqs, logits): called with each step's sampling rows (the invariance bench)

    def _mode(self):
        return batch_invariant_mode(self.model) if self.config.batch_invariant else contextlib.nullcontext()

    # ---- one step -------------------------------------------------------------------------------
    @torch.no_grad()
    def execute(self, out: SchedulerOutput) -> dict[int, int]:
        """Run the step; returns {seq_id: new token} for each sequence that samples."""
        start = time.perf_counter()
        self.store.swap_out(out.swap_out, self.cpu_k, self.cpu_v)
        self.store.swap_in(out.swap_in, self.cpu_k, self.cpu_v)
        self.store.copy_blocks(out.copies)
        if not out.scheduled:
            self.last_step_seconds = time.perf_counter() - start
            return {}
        ids, positions, slots, q_lens, seq_lens, tables, rows, samplers = [], [], [], [], [], [], [], []
        bs = self.config.block_size
        for item in out.scheduled:
            seq, n = item.seq, item.num_new_tokens
            first = seq.num_computed_tokens
            ids += seq.token_ids[first:first + n]
            positions += range(first, first + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(first, first + n)]
            q_lens.append(n)
            seq_lens.append(first + n)
            tables.append(table)
            if item.samples:
                rows.append(len(ids) - 1)
                samplers.append(seq)
        if out.is_decode_only and self.use_graphs and len(ids) <= GRAPH_BATCH_SIZES[-1]:
            logits = self._replay(ids, positions, slots, seq_lens, tables)
        else:
            torch_path = not self.store.use_kernels and not self.config.batch_invariant
            meta = AttentionMetadata.build(q_lens, seq_lens, tables, slots, self.device, with_torch_path=torch_path)
            self.store.metadata = meta
            dev = self.device
            with self._mode():
                logits = self.model(torch.tensor([ids], device=dev), torch.tensor([positions], device=dev),
                                    cache=self.store, logits_indices=torch.tensor(rows, dtype=torch.long, device=dev),
                                    validate=False)[0]
        tokens = self._sample(logits, samplers)
        self.last_step_seconds = time.perf_counter() - start
        return tokens

    def _sample(self, logits: torch.Tensor, seqs) -> dict[int, int]:
        """Greedy rows: one argmax on the device and one copy back; the others sample on the CPU with
        their own seeded generators."""
        if not seqs:
            return {}
        if self.on_logits is not None:
            self.on_logits(seqs, logits)
        greedy = logits.argmax(-1)
        nan_rows = torch.isnan(logits).any(-1)
        greedy, nan_rows = greedy.tolist(), nan_rows.tolist()
        tokens = {}
        for i, seq in enumerate(seqs):
            if nan_rows[i]:
                raise FloatingPointError(f"request {seq.seq_id}: the model produced NaN logits; check the weights "
                                         "(NaN in the checkpoint, an fp16 overflow) or run in float32")
            if seq.params.greedy:
                tokens[seq.seq_id] = greedy[i]
            else:
                tokens[seq.seq_id] = sample(logits[i].float().cpu(), seq.params, seq.generator)
        return tokens

    # ---- CUDA graphs for decode -----------------------------------------------------------------
    def _bucket(self, n: int) -> int:
        return next(b for b in GRAPH_BATCH_SIZES if b >= n)

    def _replay(self, ids, positions, slots, seq_lens, tables) -> torch.Tensor:
        n = len(ids)
        bucket = self._bucket(n)
        if bucket not in self._graphs:
            self._capture(bucket)
        graph, buf, logits = self._graphs[bucket]
        host_tables = torch.zeros(bucket, self.max_blocks_per_seq, dtype=torch.int32)
        for i, t in enumerate(tables):
            host_tables[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
        pad = bucket - n
        buf["ids"].copy_(torch.tensor(ids + [0] * pad), non_blocking=True)
        buf["positions"].copy_(torch.tensor(positions + [0] * pad), non_blocking=True)
        buf["slots"].copy_(torch.tensor(slots + [-1] * pad), non_blocking=True)  # -1: padding rows write nothing
        buf["seq_lens"].copy_(torch.tensor(seq_lens + [1] * pad, dtype=torch.int32), non_blocking=True)
        buf["tables"].copy_(host_tables, non_blocking=True)
        graph.replay()
        return logits[:n]

    def _capture(self, bucket: int) -> None:
        dev = self.device
        buf = {"ids": torch.zeros(bucket, dtype=torch.int64, device=dev),
               "positions": torch.zeros(bucket, dtype=torch.int64, device=dev),
               "slots": torch.full((bucket,), -1, dtype=torch.int64, device=dev),
               "seq_lens": torch.ones(bucket, dtype=torch.int32, device=dev),
               "tables": torch.zeros(bucket, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
               # every tensor the graph reads must outlive it: the replay reads these addresses, not the names
               "cu_seqlens_q": torch.arange(bucket + 1, dtype=torch.int32, device=dev),
               "rows": torch.arange(bucket, device=dev)}
        meta = AttentionMetadata(buf["slots"], buf["tables"], buf["seq_lens"], buf["cu_seqlens_q"], 1, True)
        rows = buf["rows"]

        def forward():
            self.store.metadata = meta
            with self._mode():  # the graph records the mode's kernels; a replay needs no mode
                return self.model(buf["ids"][None], buf["positions"][None], cache=self.store, logits_indices=rows,
                                  validate=False)[0]

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up: Triton compiles, cuBLAS picks its kernels
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = forward()
        self._graphs[bucket] = (graph, buf, logits)

    def capture_all(self, max_batch: int) -> None:
        """Capture every bucket up to ``max_batch`` now (largest first, so the smaller ones reuse its memory)."""
        if not self.use_graphs:
            return
        for b in sorted((b for b in GRAPH_BATCH_SIZES if b <= self._bucket(max_batch)), reverse=True):
            if b not in self._graphs:
                self._capture(b)
