"""One MoE layer's experts at decode batch sizes: the grouped Triton kernel, a per-expert torch loop, and a
dense MLP of the same active size; plus the amortisation measurement (distinct experts touched per step).

    for shape in mixtral-8x7b (H 4096, I 14336, E 8, top-2), qwen3-30b-a3b (H 2048, I 768, E 128, top-8):
        for B in 1, 2, 4, ..., 256 tokens (random router logits -> softmax -> top-k, renormalised):
            labkit_fused_moe    kernels.moe.fused_moe: 2 launches (gate/up + SwiGLU, down + weight)
            torch_expert_loop   for each expert some token chose: gather, 3 matmuls, index_add (HF's loop)
            torch_grouped_mm    torch._grouped_mm over the sorted tokens (if this torch has it)
            dense_active        a dense SwiGLU of width k * I: the same FLOPs per token, a fixed weight
        touched = distinct experts in the routing (measured) vs E * (1 - (1 - k/E)^B) (predicted)

``weight_bytes`` in each row is what must move: touched experts' weights for the MoE impls, the whole
dense MLP for ``dense_active``; ``gbps`` divides it (plus x and y) by the median time, so the roofline
figure can put every impl against the copy bandwidth recorded in ``copy_gbps``.

On a GPU: ``python -m labkit.bench moe [--sweep]`` -> data/bench/moe.json. Without one, ``--quick --out FILE``
runs tiny shapes in Triton's interpreter (correctness and experts touched, no times).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.moe import fused_moe, fused_moe_ref
from labkit.bench import record
from labkit.moe_amortisation import expected_experts_touched, experts_touched

SHAPES = {"mixtral-8x7b": dict(hidden=4096, inter=14336, experts=8, top_k=2),
          "qwen3-30b-a3b": dict(hidden=2048, inter=768, experts=128, top_k=8)}
QUICK_SHAPES = {"tiny": dict(hidden=64, inter=48, experts=8, top_k=2)}
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_BATCHES = (1, 4, 16)
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): small BLOCK_M while few tokens share an expert (vLLM's choice).
SWEEP = [(16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (16, 64, 256, 4, 3), (32, 64, 128, 4, 4), (64, 128, 64, 8, 3),
         (64, 64, 64, 4, 4)]


def default_blocks(batch: int, top_k: int, num_experts: int) -> dict:
    per_expert = batch * top_k / num_experts
    if per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def routing(batch: int, experts: int, top_k: int, device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed + batch)
    probs = torch.softmax(torch.randn(batch, experts, generator=g), -1)
    w, ids = torch.topk(probs, top_k, -1)
    return ids.to(device), (w / w.sum(-1, keepdim=True)).to(device)


def expert_loop(x, w13, w2, ids, weights):
    """HF's loop: one gather and three matmuls per expert some token chose (a host sync per expert)."""
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    for e in torch.unique(ids).tolist():
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        gu = x[tok] @ w13[e].T
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        out.index_add_(0, tok, (h @ w2[e].T) * weights[tok, slot, None].to(x.dtype))
    return out


def grouped_mm(x, w13_t, w2_t, ids, weights):
    """torch._grouped_mm on tokens sorted by expert (w13_t (E, H, 2I), w2_t (E, I, H): K-major per expert)."""
    n, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=w13_t.shape[0]), 0).to(torch.int32)
    xs = x[order // k]  # (N * k, H) tokens in expert order
    gu = torch._grouped_mm(xs, w13_t, offs=offs)
    inter = w2_t.shape[1]
    h = F.silu(gu[:, :inter]) * gu[:, inter:]
    y = torch._grouped_mm(h, w2_t, offs=offs) * weights.reshape(-1)[order, None].to(x.dtype)
    out = torch.zeros(n * k, x.shape[1], dtype=x.dtype, device=x.device)
    out[order] = y
    return out.view(n, k, -1).sum(1)


def dense_mlp(x, w13_dense, w2_dense):
    inter = w2_dense.shape[1]
    gu = x @ w13_dense.T
    return (F.silu(gu[:, :inter]) * gu[:, inter:]) @ w2_dense.T


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few batches (runs in the interpreter on a CPU)")
    parser.add_argument("--sweep", action="store_true", help="try several block configs per (shape, batch), keep the fastest")
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    parser.add_argument("--rep-ms", type=int, default=100)


def run(args) -> dict:
    gpu = torch.cuda.is_available()
    if not gpu and not (args.quick and args.out):
        raise SystemExit("labkit.bench moe times GPU kernels; on a CPU run `python -m labkit.bench moe --quick "
                         "--out /tmp/moe.json` (tiny shapes in the interpreter, no times) and replot data/bench/moe.json")
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes = QUICK_SHAPES if args.quick else {k: SHAPES[k] for k in (args.shapes or SHAPES)}
    batches = args.batches or (QUICK_BATCHES if args.quick else BATCHES)
    result = {"dtype": str(dtype).replace("torch.", ""), "batches": list(batches), "shapes": shapes, "rows": [],
              "touched": [], "copy_gbps": record.copy_bandwidth_gbps() if gpu else None}
    for name, s in shapes.items():
        h, i, e, k = s["hidden"], s["inter"], s["experts"], s["top_k"]
        torch.manual_seed(0)
        w13 = (torch.randn(e, 2 * i, h, device=device) / h**0.5).to(dtype)
        w2 = (torch.randn(e, h, i, device=device) / i**0.5).to(dtype)
        w13_dense = (torch.randn(2 * k * i, h, device=device) / h**0.5).to(dtype)
        w2_dense = (torch.randn(h, k * i, device=device) / (k * i)**0.5).to(dtype)
        w13_t, w2_t = w13.transpose(1, 2), w2.transpose(1, 2)  # views: (E, H, 2I), (E, I, H)
        expert_bytes = 3 * h * i * w13.element_size()
        for b in batches:
            x = torch.randn(b, h, device=device).to(dtype)
            ids, weights = routing(b, e, k, device)
            touched = experts_touched(ids)
            result["touched"].append(dict(shape=name, batch=b, measured=touched,
                                          predicted=expected_experts_touched(b, e, k)))
            ref = fused_moe_ref(x, w13, w2, ids, weights).float()
            io_bytes = 2 * b * h * w13.element_size()
            moe_bytes = touched * expert_bytes
            common = dict(shape=name, batch=b, experts_touched=touched)
            if not gpu:  # the interpreter: correctness only
                got = fused_moe(x, w13, w2, ids, weights, blocks=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16))
                result["rows"].append(dict(impl="labkit_fused_moe", rel_err=record.rel_err(got, ref),
                                           weight_bytes=moe_bytes, **common))
                print(f"{name} B={b}: touched {touched} of {e} experts; rel_err {result['rows'][-1]['rel_err']:.2e}")
                continue
            configs = [default_blocks(b, k, e)]
            if args.sweep:
                configs += [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st)
                            for bm, bn, bk, w, st in SWEEP]
            tries = [record.measure("labkit_fused_moe", lambda c=c: fused_moe(x, w13, w2, ids, weights, blocks=c), ref,
                                    moe_bytes + io_bytes, args.rep_ms, config=c, weight_bytes=moe_bytes, **common)
                     for c in configs]
            timed = [t for t in tries if "median_ms" in t]
            best = min(timed, key=lambda t: t["median_ms"]) if timed else tries[0]
            if args.sweep:
                best["sweep"] = [{"config": t["config"], "median_ms": t.get("median_ms")} for t in tries]
            rows = [best,
                    record.measure("torch_expert_loop", lambda: expert_loop(x, w13, w2, ids, weights), ref,
                                   moe_bytes + io_bytes, args.rep_ms, weight_bytes=moe_bytes, **common),
                    record.measure("torch_grouped_mm", lambda: grouped_mm(x, w13_t, w2_t, ids, weights), ref,
                                   moe_bytes + io_bytes, args.rep_ms, weight_bytes=moe_bytes, **common),
                    record.measure("dense_active", lambda: dense_mlp(x, w13_dense, w2_dense), None,
                                   k * expert_bytes + io_bytes, args.rep_ms, weight_bytes=k * expert_bytes, **common)]
            for r in rows:
                print(f"{name} B={b:4d} {r['impl']:18s} {r.get('median_ms', float('nan')):8.4f} ms "
                      f"{r.get('gbps', float('nan')):7.0f} GB/s  touched {touched}/{e}  {r.get('error', '')}", flush=True)
            result["rows"] += rows
            del x
    return result
