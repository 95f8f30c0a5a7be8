"""Batch invariance: a request's logits must not depend on who else is in its batch.

A serving engine packs many requests into one forward. The kernels it calls choose their blocking from the
shapes they see, so the same request's numbers change with the batch: the sum over K of one output element
is taken in a different order for M = 1 than for M = 64, and floating-point addition is not associative.
At temperature 0 a one-bit change flips a near-tie and the completion diverges from there on.

The batch-invariant mode fixes every reduction order from the row's own shape alone:

    op          default (fast, batch-dependent)               batch-invariant
    matmul      cuBLAS / MKL pick a kernel per M (split-K)    GPU: one Triton tile config for every M, no split-K
                                                              CPU: each row its own M = 1 call
    RMSNorm     torch reduce picks a strategy per shape       GPU: one program per row; CPU: already row-wise
    silu, RoPE  CPU: a SIMD loop with a scalar tail, so an    CPU: padded to whole SIMD vectors, so every element
                element's bits depend on where it falls       takes the vector path
    attention   decode: split-K chosen by batch size;         one program per query, keys in tiles of KV_SPLIT
                CPU: padded groups as wide as the longest     from position 0 (online softmax): decode, mixed step
                sequence in the step                          or any prefill chunking reduce the same tiles

``batch_invariant_mode(model)`` switches a LlamaForCausalLM into it for a ``with`` block (module forwards
swapped, restored on exit); ``EngineConfig(batch_invariant=True)`` makes the engine run every step inside it
and attend with :func:`paged_attention`. GPU kernels: kernels/batch_invariant.py. The measurement:
``python -m labkit.bench batch_invariance``; the lesson: notebook 14.
Quantised linears (labkit.quant) and MoE routing are left as they are: this mode covers the dense model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import batch_invariant as invariant_kernels
from kernels.batch_invariant import KV_SPLIT

# Elements per padded pointwise call: a multiple of every SIMD loop's 2 * vector width (AVX-512 bf16: 64).
SIMD_PAD = 64


def kv_split_size(num_tokens: int) -> int:
    """Keys per attention tile for a step of ``num_tokens`` packed queries: KV_SPLIT whatever the step. A split
    chosen from the step's shape (as the default decode kernels choose theirs) would undo the whole mode."""
    return KV_SPLIT


# ---- ops ---------------------------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with each row's result independent of the other rows."""
    rows = x.reshape(-1, x.shape[-1])  # (M, K)
    if rows.shape[0] == 0:  # a step whose sequences are all mid-prompt samples no row
        return F.linear(x, weight, bias)
    if x.is_cuda:
        out = invariant_kernels.matmul(rows, weight, bias)
    else:  # every row the same M = 1 call, so MKL takes the same path for it whatever M is
        out = torch.cat([F.linear(rows[i:i + 1], weight, bias) for i in range(rows.shape[0])])
    return out.reshape(*x.shape[:-1], weight.shape[0])


def pointwise(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an elementwise ``fn`` so that each element's bits do not depend on the tensor's size.

    torch's CPU loops run whole SIMD vectors and finish the last ``numel % (2 * width)`` elements with the
    scalar function; for silu the two differ in the last bit (a row at the end of one batch but not of
    another changes). Padding to whole vectors sends every element down the vector path. Threads split a
    loop only above 32768 elements, into equal chunks: pad to whole vectors per thread too."""
    if x.is_cuda:  # CUDA elementwise kernels compute every element with the same instructions
        return fn(x)
    flat = x.reshape(-1)
    pad = (-flat.numel()) % (SIMD_PAD * torch.get_num_threads())
    return fn(F.pad(flat, (0, pad)))[:flat.numel()].reshape(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with each row reduced alone in a fixed order (labkit.model.RMSNorm's formula)."""
    if x.is_cuda:
        return invariant_kernels.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).reshape(x.shape)
    # torch's CPU sum over a contiguous last dim reduces each row with the same code, whatever the row count,
    # and its rsqrt is 1 / sqrt (both correctly rounded) in the vector and the scalar loop alike
    return invariant_kernels.rms_norm_ref(x, weight, eps)


def paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_query_len: int,
                    use_kernels: bool, scale=None) -> torch.Tensor:
    """Batch-invariant causal attention of a packed step: q (N, Hq, D) -> (N, Hq, D).

    Arguments as kernels/prefill_attention.paged_prefill_attention. ``use_kernels``: the Triton kernel
    (GPU or interpreter); else the same algorithm in torch (:func:`paged_attention_torch`)."""
    if use_kernels:
        return invariant_kernels.paged_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                                 max_query_len, scale=scale, kv_split=kv_split_size(q.shape[0]))
    return paged_attention_torch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale)


def paged_attention_torch(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=None) -> torch.Tensor:
    """The kernel's algorithm in plain torch: every query walks its keys in tiles of kv_split_size() from 0.

    All queries advance one tile at a time together; a tile past a query's position is all -inf for it, so
    its update is exactly ``acc * 1 + 0`` and the number of tiles the step needs changes nothing. Products are
    laid out so that each sum runs over a contiguous last dim (D for scores, the tile for P @ V)."""
    N, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    T = kv_split_size(N)
    scale = D ** -0.5 if scale is None else scale
    dev = q.device
    cu, lens = cu_seqlens_q.long(), seq_lens.long()
    q_lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(len(q_lens), device=dev), q_lens, output_size=N)  # (N,)
    pos = lens[seq] - q_lens[seq] + torch.arange(N, device=dev) - cu[seq]  # (N,) absolute positions
    tables = block_tables.long()[seq]  # (N, width)
    qf = q.float().view(N, Hkv, G, 1, D)
    m = torch.full((N, Hkv, G), float("-inf"), device=dev)
    l = torch.zeros(N, Hkv, G, device=dev)
    acc = torch.zeros(N, Hkv, G, D, device=dev)
    for start in range(0, int(pos.max()) + 1, T):
        n = start + torch.arange(T, device=dev)  # (T,) key positions
        live = n[None, :] <= pos[:, None]  # (N, T)
        blocks = tables.gather(1, (n // bs).clamp(max=tables.shape[1] - 1).expand(N, T))  # (N, T)
        k = k_cache[blocks, (n % bs).expand(N, T)].float()  # (N, T, Hkv, D)
        v = v_cache[blocks, (n % bs).expand(N, T)].float()
        k = torch.where(live[:, :, None, None], k, 0.0).permute(0, 2, 1, 3)[:, :, None]  # (N, Hkv, 1, T, D)
        v = torch.where(live[:, :, None, None], v, 0.0).permute(0, 2, 3, 1)[:, :, None]  # (N, Hkv, 1, D, T)
        s = (qf * k).sum(-1) * scale  # (N, Hkv, G, T)
        s = s.masked_fill(~live[:, None, None, :], float("-inf"))
        m_new = torch.maximum(m, s.amax(-1))
        alpha = pointwise(torch.exp, m - m_new)  # (N, Hkv, G): a size that changes with N
        p = pointwise(torch.exp, s - m_new[..., None])
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + (p[:, :, :, None, :] * v).sum(-1)  # (N, Hkv, G, D)
        m = m_new
    return (acc / l[..., None]).reshape(N, Hq, D).to(q.dtype)


# ---- switching a model into the mode -----------------------------------------------------------
def _linear_forward(module: nn.Linear):
    return lambda x: linear(x, module.weight, module.bias)


def _rms_norm_forward(module):
    return lambda x: rms_norm(x, module.weight, module.eps)


def _mlp_forward(module):
    def forward(x):
        return module.down_proj(pointwise(F.silu, module.gate_proj(x)) * module.up_proj(x))  # SwiGLU
    return forward


def _rotary_forward(module):
    def forward(positions, dtype):
        freqs = positions[..., None].float() * module.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return pointwise(torch.cos, emb).to(dtype)[:, None], pointwise(torch.sin, emb).to(dtype)[:, None]
    return forward


@contextlib.contextmanager
def batch_invariant_mode(model: nn.Module):
    """Inside the block, ``model``'s linears, norms, MLP activations and rotary tables are batch-invariant.

    The swap is of instance ``forward`` attributes, undone on exit (also on an error), so the model object,
    its weights and a CUDA graph captured inside the block stay valid. Attention is the KV store's: the engine
    passes ``batch_invariant`` to it (see labkit/engine/kv_store.py)."""
    from labkit.model import MLP, RMSNorm, RotaryEmbedding

    swaps = {nn.Linear: _linear_forward, RMSNorm: _rms_norm_forward, MLP: _mlp_forward,
             RotaryEmbedding: _rotary_forward}
    patched = []
    try:
        for module in model.modules():
            make = swaps.get(type(module))  # exact types: a quantised linear subclass keeps its own forward
            if make is not None and "forward" not in module.__dict__:
                module.forward = make(module)
                patched.append(module)
        yield model
    finally:
        for module in patched:
            del module.forward


# ---- the experiment: one request alone, then among others ---------------------------------------
@dataclasses.dataclass
class Completion:
    """What the target request got: its greedy tokens and the logits each one was chosen from."""

    tokens: list[int]
    logits: torch.Tensor  # (num_tokens, vocab) float32 on the CPU


def make_engine(model, *, batch_invariant: bool, max_num_batched_tokens: int = 2048, num_blocks: int = 256,
                block_size: int = 16, max_num_seqs: int = 64):
    """An engine for the experiment (no EOS: every request runs its max_tokens)."""
    from labkit.engine import EngineConfig, LLMEngine

    cfg = EngineConfig(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, batch_invariant=batch_invariant)
    return LLMEngine(model, cfg, eos_token_ids=())


def complete(engine, target: list[int], others=(), max_tokens: int = 16) -> Completion:
    """Run ``target`` greedily on ``engine`` with ``others``: (prompt, join_step) pairs, join_step < 0 queued
    before the target, else added after it once ``join_step`` steps have run. Others still running when the
    target finishes are aborted; every request is forgotten afterwards, so one engine serves many trials."""
    from labkit.sampling import SamplingParams

    def params():
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    rows: list[torch.Tensor] = []
    added = [engine.add_request(p, params()) for p, step in others if step < 0]
    seq = engine.add_request(list(target), params())
    later = sorted((step, i) for i, (p, step) in enumerate(others) if step >= 0)

    def keep(seqs, logits):
        for i, s in enumerate(seqs):
            if s is seq:
                rows.append(logits[i].float().cpu())

    engine.runner.on_logits = keep
    try:
        steps = 0
        while not seq.is_finished:
            while later and later[0][0] <= steps:
                added.append(engine.add_request(others[later.pop(0)[1]][0], params()))
            engine.step()
            steps += 1
    finally:
        engine.runner.on_logits = None
    for s in added:
        engine.abort(s.seq_id)
    for s in added + [seq]:
        engine.forget(s.seq_id)
    return Completion(list(seq.output_token_ids), torch.stack(rows))


def random_others(rng: random.Random, vocab: int, count: int, max_len: int, max_join: int) -> list:
    """``count`` random prompts of random lengths 1..max_len, each queued before the target or joining later."""
    return [([rng.randrange(vocab) for _ in range(rng.randint(1, max_len))], rng.randint(-1, max_join))
            for _ in range(count)]


def compare(alone: Completion, runs: list[Completion]) -> dict:
    """How far the runs stray from the alone run: distinct completions (alone's included), the first token
    position where any differs (None: none does), the largest |logit difference| and how many runs had
    bitwise-identical logits."""
    texts = {tuple(alone.tokens)} | {tuple(r.tokens) for r in runs}
    firsts = [first_divergence(alone.tokens, r.tokens) for r in runs]
    # logits are compared up to the first divergence: after it they condition on a different text
    diffs = [(r.logits[:n + 1] - alone.logits[:n + 1]).abs().max().item()
             for r, n in zip(runs, (len(r.tokens) if f is None else f for r, f in zip(runs, firsts)))]
    return {"runs": len(runs), "distinct_completions": len(texts),
            "first_divergent_token": min((f for f in firsts if f is not None), default=None),
            "max_abs_logit_diff": max(diffs, default=0.0),
            "bitwise_identical_runs": sum(torch.equal(r.logits, alone.logits) for r in runs)}


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (None: they agree)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))
