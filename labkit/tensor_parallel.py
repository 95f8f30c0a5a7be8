"""Tensor parallelism (Megatron-LM style): one model split across ranks, one all-reduce per half-layer.

    attention:  q/k/v_proj  column-parallel: each rank holds the rows of its query heads and KV heads
                o_proj      row-parallel: each rank multiplies its heads' slice, then  all_reduce(sum)
    MLP:        gate/up     column-parallel: each rank holds intermediate/world of the columns
                down_proj   row-parallel, then  all_reduce(sum)
    embedding   vocabulary-parallel: each rank embeds the ids in its vocabulary range, zeros elsewhere,
                then  all_reduce(sum)
    lm_head     vocabulary-parallel: each rank computes its slice of the logits, then  all_gather

So every rank holds 1/world of the weights and of the KV cache (its KV heads only: the paged pool of
each rank is sized for num_key_value_heads / world), and a layer costs two all-reduces of a (tokens,
hidden) activation. This is what vLLM's ``tensor_parallel_size`` does first.

The engine runs SPMD: every rank runs the same scheduler on the same requests, so the block tables
agree without being sent; rank 0's sampled tokens and step time are broadcast so that the ranks can
never drift apart. ``torch.distributed`` with NCCL on GPUs, gloo on the CPU.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from labkit.engine.model_runner import ModelRunner


class ColumnParallelLinear(nn.Module):
    """y_shard = x @ W_shard^T: this rank's rows of the weight (its output features); no communication."""

    def __init__(self, linear: nn.Linear, rows: slice):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.data[rows].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data[rows].clone())

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_shard @ W_shard^T) + b: this rank's columns of the weight (its input features)."""

    def __init__(self, linear: nn.Linear, cols: slice, group=None):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.data[:, cols].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone())
        self.group = group

    def forward(self, x):
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias  # the bias once, after the sum


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the embedding; ids outside embed to zero here and come from their own rank."""

    def __init__(self, embedding: nn.Embedding, start: int, end: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(embedding.weight.data[start:end].clone())
        self.start, self.end, self.group = start, end, group

    def forward(self, ids):
        mine = (ids >= self.start) & (ids < self.end)
        h = F.embedding(torch.where(mine, ids - self.start, 0), self.weight)
        h = h * mine[..., None].to(h.dtype)
        dist.all_reduce(h, group=self.group)
        return h


class VocabParallelLMHead(nn.Module):
    """This rank's slice of the logits, gathered into the whole vocabulary on every rank."""

    def __init__(self, weight: torch.Tensor | nn.Parameter, world: int, group=None):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.world, self.group = world, group

    def forward(self, h):
        part = F.linear(h, self.weight).contiguous()
        parts = [torch.empty_like(part) for _ in range(self.world)]
        dist.all_gather(parts, part, group=self.group)
        return torch.cat(parts, dim=-1)


def check_divisible(config, world: int) -> None:
    """Everything split across ranks must split evenly; say which size does not."""
    if world < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {world}")
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        value = getattr(config, name)
        if value % world:
            raise ValueError(f"{name}={value} is not divisible by tensor_parallel_size={world}; "
                             f"choose a size that divides it")


def shard_model(model, rank: int, world: int, group=None):
    """Split ``model`` (a full LlamaForCausalLM) in place into rank ``rank``'s shard of ``world``.

    Its ``config`` becomes the per-rank view (heads, KV heads and intermediate size divided by world), which
    is what sizes this rank's KV pool; head_dim, hidden size and vocabulary stay whole."""
    c = model.config
    check_divisible(c, world)
    hq, hkv, d = c.num_attention_heads // world, c.num_key_value_heads // world, c.head_dim
    inter = c.intermediate_size // world
    q_rows, kv_rows = slice(rank * hq * d, (rank + 1) * hq * d), slice(rank * hkv * d, (rank + 1) * hkv * d)
    i_rows = slice(rank * inter, (rank + 1) * inter)
    tied = c.tie_word_embeddings
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        a.q_proj, a.k_proj, a.v_proj = (ColumnParallelLinear(a.q_proj, q_rows), ColumnParallelLinear(a.k_proj, kv_rows),
                                        ColumnParallelLinear(a.v_proj, kv_rows))
        a.o_proj = RowParallelLinear(a.o_proj, q_rows, group)
        a.num_heads, a.num_kv_heads = hq, hkv
        m.gate_proj, m.up_proj = ColumnParallelLinear(m.gate_proj, i_rows), ColumnParallelLinear(m.up_proj, i_rows)
        m.down_proj = RowParallelLinear(m.down_proj, i_rows, group)
    v = c.vocab_size // world
    lm_weight = model.lm_head.weight.data[rank * v:(rank + 1) * v].clone()
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, rank * v, (rank + 1) * v, group)
    model.lm_head = VocabParallelLMHead(model.model.embed_tokens.weight if tied else lm_weight, world, group)
    model.config = dataclasses.replace(c, num_attention_heads=hq, num_key_value_heads=hkv, intermediate_size=inter,
                                       head_dim=d)
    model.tensor_parallel = (rank, world)
    return model


class TensorParallelRunner(ModelRunner):
    """Every rank runs the forward on its shard; rank 0's tokens and step time are what every rank uses."""

    def execute(self, out):
        tokens = super().execute(out)
        box = [tokens, self.last_step_seconds]
        dist.broadcast_object_list(box, src=0)
        tokens, self.last_step_seconds = box
        return tokens


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, model_dir: str | None, dtype: str,
            requests: list, engine_args: dict, result_file: str) -> None:
    import json
    import os

    from labkit.checkpoint import load_default_model, load_pretrained
    from labkit.engine import EngineConfig, LLMEngine, SamplingParams

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        torch_dtype = getattr(torch, dtype)
        model, _ = (load_default_model(dtype=torch_dtype, device=device) if model_dir is None
                    else load_pretrained(model_dir, dtype=torch_dtype, device=device))
        if world > 1:
            shard_model(model, rank, world)
        config = EngineConfig(**engine_args)
        max_len = config.max_model_len or model.config.max_position_embeddings
        runner = TensorParallelRunner(model, config, max_len)
        engine = LLMEngine(model, config, runner=runner, eos_token_ids=())
        seqs = [engine.add_request(p, SamplingParams(**sp)) for p, sp in requests]
        engine.run(max_steps=100_000)
        bm = engine.block_manager
        result = {"tokens": [s.output_token_ids for s in seqs],
                  "preemptions": engine.stats()["num_preemptions"],
                  "cached_tokens": sum(s.num_cached_tokens for s in seqs),
                  "pool_whole": bm.num_free_blocks == bm.num_blocks,
                  "kv_heads_per_rank": model.config.num_key_value_heads,
                  "kv_bytes_per_rank": 2 * runner.store.k_cache.numel() * runner.store.k_cache.element_size(),
                  "weight_bytes_per_rank": sum(p.numel() * p.element_size()
                                               for p in {id(p): p for p in model.parameters()}.values())}
        with open(f"{result_file}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def generate_tensor_parallel(requests: list, world: int, engine_args: dict, *, backend: str = "gloo",
                             model_dir: str | None = None, dtype: str = "float32", timeout_s: float = 300) -> list[dict]:
    """Serve ``requests`` ([(prompt ids, SamplingParams kwargs)]) on ``world`` ranks (one process each,
    listening on 127.0.0.1 only); returns every rank's result (tokens, per-rank memory, pool state)."""
    import json
    import tempfile

    import torch.multiprocessing as mp

    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (GPUs), got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world:
        raise ValueError(f"tensor_parallel_size={world} needs {world} GPUs, this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/result"
        ctx = mp.start_processes(_worker, args=(world, free_port(), backend, model_dir, dtype, requests, engine_args,
                                                path), nprocs=world, join=False, start_method="spawn")
        import time

        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"tensor-parallel run did not finish in {timeout_s} s")
        return [json.load(open(f"{path}.{r}")) for r in range(world)]
