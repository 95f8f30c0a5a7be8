"""Roofline of one decode step: time against batch size for one Llama-3-8B decoder layer (bf16, GPU).

What it shows. A decode step multiplies a (B, hidden) activation by every weight matrix of the layer.
The weights (436 MB per layer in bf16) are read once for the whole batch, so while B is small the step
costs the same at B = 1 and B = 64: memory-bound, time ≈ weight bytes / bandwidth. Arithmetic grows
with B (2 FLOP per weight per row), so past the ridge B* ≈ (matmul rate / bandwidth) × (bytes per
weight / 2 FLOP) the step becomes compute-bound and time grows with B. Attention is different: every
sequence reads its own KV cache, so its cost grows with B × context from the start.

    for M in tokens:        layer matmuls     (q, k, v, o, gate, up, down) on an (M, 4096) input
    for B, L in batch × ctx: decode attention  (B queries, each over its own L cached keys/values)
    for B:                   full decode layer (norms, RoPE, matmuls, cache write, attention) at ctx 1024
    for T:                   prefill attention (one sequence of T tokens, causal)
    for B:                   lm_head           (4096 → 128256, once per step for the whole model)
    ceilings:                device-to-device copy bandwidth, bf16 GEMM rate (8192³)

Every region is captured in a CUDA graph and its replays are timed (median, L2 flushed between calls),
as serving engines replay decode steps, so launch gaps are not in the numbers. Weights and caches are
random (never zeros). ``labkit.step_cost`` fits its model of a serving step to these rows.

Run on a GPU machine: ``python -m labkit.bench roofline`` → data/bench/roofline.json.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from labkit.bench import record
from labkit.step_cost import matmul_flops_bytes

DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MATMUL_TOKENS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096, 8192)
CONTEXTS = (256, 1024, 4096)
FULL_LAYER_CONTEXT = 1024
PREFILL_LENGTHS = (128, 512, 2048, 8192)


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """Dimensions of one decoder layer; the default is Llama-3-8B's."""

    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 14336
    vocab_size: int = 128256
    num_hidden_layers: int = 32

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads (GQA groups)")

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear of the layer, named as in HF Llama."""
        h, q, kv, i = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim, self.intermediate_size
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def layer_params(self) -> int:
        return sum(a * b for a, b in self.linears.values())

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Bytes of K and V one token occupies in one layer's cache."""
        return 2 * self.num_key_value_heads * self.head_dim * dtype_bytes


# --------------------------------------------------------------------------- the timed regions
def make_weights(shape: LayerShape, device, dtype=torch.bfloat16, gen: torch.Generator | None = None) -> dict:
    """Random weights (std 0.02), stored (out, in) like nn.Linear."""
    return {name: (torch.randn(o, i, device=device, dtype=dtype, generator=gen) * 0.02)
            for name, (i, o) in shape.linears.items()}


def layer_matmuls(x, w):
    """The seven matmuls of a layer on x (M, hidden); the non-matmul work is left out on purpose."""
    q, k, v = F.linear(x, w["q_proj"]), F.linear(x, w["k_proj"]), F.linear(x, w["v_proj"])
    o = F.linear(q, w["o_proj"])
    g, u = F.linear(o, w["gate_proj"]), F.linear(o, w["up_proj"])
    return F.linear(g * u, w["down_proj"]), k, v


def decode_attention(q, k_cache, v_cache):
    """One new query per sequence over its cached keys/values, GQA without copying K/V.

    q: (B, Hq, D); k_cache, v_cache: (B, Hkv, L, D). The Hq / Hkv query heads that share a KV head are
    laid out as that head's "query positions" (B, Hkv, G, D): a decode query sees every cached key,
    so no mask is needed and each K/V byte is read once.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, D)  # (B, Hkv, G, D)
    out = F.scaled_dot_product_attention(qg, k_cache, v_cache)  # (B, Hkv, G, D)
    return out.reshape(B, Hq, D)


def decode_attention_ref(q, k_cache, v_cache):
    """Plain-torch GQA reference for decode_attention (fp32)."""
    B, Hq, D = q.shape
    group = Hq // k_cache.shape[1]
    k = k_cache.float().repeat_interleave(group, dim=1)  # (B, Hq, L, D)
    v = v_cache.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhld->bhl", q.float(), k) / math.sqrt(D)
    return torch.einsum("bhl,bhld->bhd", scores.softmax(-1), v)


def _rope(x, cos, sin):
    """Rotate-half RoPE on (..., D); here only for its cost."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def decode_layer(x, w, k_cache, v_cache, cos, sin, shape: LayerShape):
    """A whole decode step of one layer for B sequences whose caches hold L positions.

    x: (B, hidden); k_cache, v_cache: (B, Hkv, L, D); the new token's K/V go to position L - 1.
    """
    B = x.shape[0]
    Hq, Hkv, D = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    h = F.rms_norm(x, (x.shape[-1],))
    q = _rope(F.linear(h, w["q_proj"]).view(B, Hq, D), cos, sin)
    k = _rope(F.linear(h, w["k_proj"]).view(B, Hkv, D), cos, sin)
    v = F.linear(h, w["v_proj"]).view(B, Hkv, D)
    k_cache[:, :, -1] = k
    v_cache[:, :, -1] = v
    a = decode_attention(q, k_cache, v_cache).reshape(B, Hq * D)
    x = x + F.linear(a, w["o_proj"])
    h = F.rms_norm(x, (x.shape[-1],))
    return x + F.linear(F.silu(F.linear(h, w["gate_proj"])) * F.linear(h, w["up_proj"]), w["down_proj"])


def prefill_attention(q, k, v):
    """Causal attention of one sequence over itself: q, k, v (1, Hq, T, D), K/V already expanded to
    the query heads (prefill is compute-bound, so reading the expanded copy costs little)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# --------------------------------------------------------------------------- timing helpers
def _row(impl, ms, flops, nbytes, **fields):
    return {"impl": impl, **fields, "median_ms": ms, "flops": int(flops), "bytes": int(nbytes),
            "tflops": flops / (ms * 1e-3) / 1e12, "gbps": nbytes / (ms * 1e-3) / 1e9}


def matmul_rate_tflops(n: int = 8192) -> float:
    """bf16 GEMM rate of a large square product on random data: the compute ceiling."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = record.time_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _check(shape: LayerShape, device) -> dict:
    """Correctness first: the GQA decode trick against the fp32 reference, and a graph replay
    against eager, on fresh random inputs."""
    gen = torch.Generator(device=device).manual_seed(0)
    B, L = 3, 77
    q = torch.randn(B, shape.num_attention_heads, shape.head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    kc = torch.randn(B, shape.num_key_value_heads, L, shape.head_dim, device=device, dtype=torch.bfloat16, generator=gen)
    vc = torch.randn_like(kc)
    ref = decode_attention_ref(q, kc, vc)
    rel_attn = ((decode_attention(q, kc, vc).float() - ref).norm() / ref.norm()).item()
    w = make_weights(shape, device, gen=gen)
    x = torch.randn(5, shape.hidden_size, device=device, dtype=torch.bfloat16, generator=gen)
    eager = layer_matmuls(x, w)[0].float()
    out = {}
    replay = record.graphed(lambda: out.__setitem__("y", layer_matmuls(x, w)[0]))
    out["y"].fill_(float("nan"))  # poison: the replay must rewrite it
    replay()
    rel_graph = ((out["y"].float() - eager).norm() / eager.norm()).item()
    if not (rel_attn < 1e-2 and rel_graph < 1e-6):
        raise AssertionError(f"roofline self-check failed: attention rel err {rel_attn:.2e}, graph rel err {rel_graph:.2e}")
    return {"decode_attention_rel_err": rel_attn, "graph_vs_eager_rel_err": rel_graph}


# --------------------------------------------------------------------------- the benchmark
def add_arguments(parser):
    parser.add_argument("--max-batch", type=int, default=max(DECODE_BATCHES), help="largest decode batch")


def run(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("roofline measures a GPU: no CUDA device here. Replot the recorded figures with "
                         "labkit.bench.load('roofline'), or run `python -m labkit.bench roofline` on a GPU machine.")
    shape, dev, bf16 = LayerShape(), torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    checks = _check(shape, dev)
    rows = []
    Hq, Hkv, D, hid = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim, shape.hidden_size
    batches = [b for b in DECODE_BATCHES if b <= args.max_batch]
    w = make_weights(shape, dev)

    # 1. the layer's matmuls on M tokens (a decode batch of M, or a prefill chunk of M tokens)
    for M in MATMUL_TOKENS:
        x = torch.randn(M, hid, device=dev, dtype=bf16)
        ms = record.time_ms(record.graphed(lambda: layer_matmuls(x, w)))
        flops, nbytes = matmul_flops_bytes(list(shape.linears.values()), M)
        rows.append(_row("layer_matmuls", ms, flops, nbytes, tokens=M, batch=M, context=0))
        print(f"layer_matmuls   M={M:5d}  {ms:8.4f} ms", flush=True)

    # 2. decode attention: B sequences, each over its own L cached tokens
    for L in CONTEXTS:
        for B in batches:
            q = torch.randn(B, Hq, D, device=dev, dtype=bf16)
            kc = torch.randn(B, Hkv, L, D, device=dev, dtype=bf16)
            vc = torch.randn_like(kc)
            ms = record.time_ms(record.graphed(lambda: decode_attention(q, kc, vc)))
            flops = 4 * B * Hq * L * D
            nbytes = B * L * shape.kv_bytes_per_token() + 2 * q.numel() * 2
            rows.append(_row("decode_attention", ms, flops, nbytes, tokens=B, batch=B, context=L))
            print(f"decode_attention B={B:4d} L={L:5d}  {ms:8.4f} ms", flush=True)
            del kc, vc

    # 3. the whole decode layer at one context: checks that matmuls + attention add up
    L = FULL_LAYER_CONTEXT
    for B in batches:
        x = torch.randn(B, hid, device=dev, dtype=bf16)
        kc = torch.randn(B, Hkv, L, D, device=dev, dtype=bf16)
        vc = torch.randn_like(kc)
        cos, sin = torch.rand(D, device=dev, dtype=bf16), torch.rand(D, device=dev, dtype=bf16)
        ms = record.time_ms(record.graphed(lambda: decode_layer(x, w, kc, vc, cos, sin, shape)))
        flops = sum(2 * B * i * o for i, o in shape.linears.values()) + 4 * B * Hq * L * D
        nbytes = 2 * shape.layer_params + B * L * shape.kv_bytes_per_token()
        rows.append(_row("decode_layer", ms, flops, nbytes, tokens=B, batch=B, context=L))
        print(f"decode_layer    B={B:4d} L={L:5d}  {ms:8.4f} ms", flush=True)
        del kc, vc

    # 4. prefill attention of one sequence of T tokens (causal)
    for T in PREFILL_LENGTHS:
        q = torch.randn(1, Hq, T, D, device=dev, dtype=bf16)
        k = torch.randn(1, Hkv, T, D, device=dev, dtype=bf16).repeat_interleave(Hq // Hkv, 1)  # (1, Hq, T, D)
        v = torch.randn(1, Hkv, T, D, device=dev, dtype=bf16).repeat_interleave(Hq // Hkv, 1)
        ms = record.time_ms(record.graphed(lambda: prefill_attention(q, k, v)))
        flops = 4 * Hq * D * T * (T + 1) / 2
        nbytes = 2 * 4 * q.numel()
        rows.append(_row("prefill_attention", ms, flops, nbytes, tokens=T, batch=1, context=T))
        print(f"prefill_attention T={T:5d}  {ms:8.4f} ms", flush=True)

    # 5. the output projection, once per step for the whole model
    del w
    w_head = torch.randn(shape.vocab_size, hid, device=dev, dtype=bf16) * 0.02
    for B in batches:
        x = torch.randn(B, hid, device=dev, dtype=bf16)
        ms = record.time_ms(record.graphed(lambda: F.linear(x, w_head)))
        flops = 2 * B * hid * shape.vocab_size
        nbytes = 2 * (hid * shape.vocab_size + B * hid + B * shape.vocab_size)
        rows.append(_row("lm_head", ms, flops, nbytes, tokens=B, batch=B, context=0))
        print(f"lm_head         B={B:4d}  {ms:8.4f} ms", flush=True)
    del w_head

    copy_gbps = record.copy_bandwidth_gbps()
    tflops = matmul_rate_tflops()
    ridge = tflops * 1e12 / (copy_gbps * 1e9)  # FLOP per byte where the two ceilings meet
    print(f"copy bandwidth {copy_gbps:.0f} GB/s; bf16 GEMM {tflops:.0f} TFLOP/s; ridge {ridge:.0f} FLOP/byte")
    return {
        "shapes": {**dataclasses.asdict(shape), "dtype": "bfloat16", "layer_params": shape.layer_params,
                   "layer_weight_bytes": 2 * shape.layer_params, "kv_bytes_per_token_per_layer": shape.kv_bytes_per_token(),
                   "full_layer_context": FULL_LAYER_CONTEXT, "timing": "CUDA-graph replay, do_bench median, L2 flushed"},
        "copy_gbps": copy_gbps,
        "matmul_tflops": tflops,
        "ridge_flop_per_byte": ridge,
        "checks": checks,
        "rows": rows,
    }
