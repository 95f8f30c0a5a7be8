"""The whole engine on quantised weights: decode tokens/s at batch 1, 8, 32 for bf16, int8, int4 g128 and ternary.

Model: the engine benchmark's Llama-3.2-1B shape (:data:`labkit.bench.engine.LLAMA_1B`, random weights, bf16 on
the GPU). Each scheme swaps the *decoder* linears (q, k, v, o, gate, up, down) in place:

    bf16        nothing (cuBLAS)
    int8        labkit.quant.quantize_model(model, "int8")       QuantLinear -> kernels/quant_matmul.py
    int4_g128   labkit.quant.quantize_model(model, "int4_g128")  QuantLinear -> kernels/quant_matmul.py
    ternary     labkit.ternary.ternarise_model(model)            TernaryLinear -> kernels/ternary.py

The embedding and the LM head (tied to it) stay bf16, as labkit.quant's default ``skip=("lm_head",)`` and BitNet
do. That head is 128256 x 2048 weights, a fifth of the model's bytes in bf16 and half of them once the decoder is
int4, so it caps the batch-1 gain: ``--lm-head int4_g128`` quantises it too (the embedding keeps its bf16 copy,
of which a step reads only the rows of its tokens).

For each scheme: quantise on the device, check it (below), build LLMEngine with CUDA-graph decode and time
``--steps`` decode steps of B sequences with ``--context`` cached tokens each (``labkit.bench.engine.decode_rows``).
Rows: tokens/s = B / step time, the floor = (weight bytes a step reads + K/V bytes) / copy bandwidth, and each
scheme's ratio to bf16 at the same batch (and the ratio of the floors: the most it could gain).

Checks, so that a broken kernel cannot produce a fast number (a failed check stops the run, naming the scheme):

    layer_rel_err_max   one forward of m = 1, 8, 64 tokens (GEMV and both GEMM tilings): each quantised layer's
                        output against F.linear (cuBLAS) of its input with its dequantised weight, worst layer
    logits_rel_err[m]   (recorded, not gated) the same forward's logits against the model with every quantised
                        weight replaced by its dequantised bf16 matrix
    graph_tokens        greedy tokens of one prompt through the engine with CUDA graphs == with enforce_eager
                        (same kernels: any difference is a capture that replays stale state)

``--fused``: labkit.fused_ops.fuse_model between building and quantising (qkv_proj / gate_up_proj are what gets
quantised; ternary is refused: its per-tensor scales are not defined on the fused projections).

GPU: ``python -m labkit.bench engine_quant`` (writes data/bench/engine_quant.json).
CPU smoke run (tiny model, Triton interpreter): ``python -m labkit.bench engine_quant --quick --out /tmp/q.json``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from labkit.bench.engine import LLAMA_1B, decode_rows, free_gpu_memory, make_model
from labkit.engine import EngineConfig, LLMEngine, SamplingParams
from labkit.fused_ops import check_fusable_scheme, fuse_model
from labkit.quant import QuantLinear, get_scheme, quantize_model
from labkit.ternary import LINEAR_NAMES, TernaryLinear, ternarise_model

SCHEMES = ("bf16", "int8", "int4_g128", "ternary")
DENSE = ("bf16", "fp16")  # the unquantised model, named after its dtype (--activations fp16 renames "bf16")
# hidden and intermediate are multiples of 128 so that int4 g128 needs no padding
QUICK = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, tie_word_embeddings=True)
CHECK_SIZES = (1, 8, 64)  # tokens of one forward: the GEMV path (m = 1) and the GEMM path's two BLOCK_M tilings
MAX_REL_ERR = 0.03  # of a layer's output: bf16 rounding gives ~4e-3, scales 10% off 0.1, a wrong layout ~1
GRAPH_TOKENS = 8
FUSED_NAMES = ("qkv_proj", "gate_up_proj")  # labkit.fused_ops's concatenated decoder linears
TARGET = 2.5  # issue 16: int4 g128 decode at batch 1 against bf16's, on the GPU


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU, Triton interpreter (a smoke run)")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help=f"comma-separated, from {SCHEMES}")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--context", type=int, default=512, help="cached tokens per sequence in the decode steps")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed per batch size")
    parser.add_argument("--lm-head", default="bf16", help="bf16 (default) or a labkit.quant scheme for the LM head")
    parser.add_argument("--eager", action="store_true", help="also time every batch with enforce_eager=True")
    parser.add_argument("--activations", default="bf16", choices=("bf16", "fp16"),
                        help="the model's dtype: the dense baseline's weights and every scheme's activations "
                             "(fp16 is what the int4 / int8 GEMVs' word-at-a-time PTX paths take)")
    parser.add_argument("--fused", action="store_true", help="labkit.fused_ops.fuse_model before quantising")


def _parse(args) -> tuple[list[str], list[int]]:
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    bad = [s for s in schemes if s not in SCHEMES]
    if bad or not schemes:
        raise ValueError(f"--schemes {args.schemes!r}: unknown {bad}; choose from {SCHEMES}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise ValueError(f"--batches {args.batches!r} must be comma-separated integers, e.g. 1,8,32") from None
    if any(b < 1 for b in batches):
        raise ValueError(f"--batches {args.batches!r}: every batch must be >= 1")
    if args.lm_head != "bf16":
        get_scheme(args.lm_head)  # a clear ValueError for an unknown scheme before anything is built
    if getattr(args, "fused", False):
        for s in schemes:
            check_fusable_scheme(s)
    return schemes, batches


def apply_scheme(model: nn.Module, scheme: str, lm_head: str = "bf16", backend: str = "auto") -> nn.Module:
    """Quantise ``model``'s decoder linears in place with ``scheme`` (and its LM head with ``lm_head``)."""
    if scheme == "ternary":
        ternarise_model(model, backend=backend)
    elif scheme not in DENSE:
        quantize_model(model, scheme, backend=backend)  # skip=("lm_head",) by default
    if scheme not in DENSE and lm_head != "bf16":
        quantize_model(model, lm_head, skip=(), backend=backend)  # the only nn.Linear left is the head
    return model


def dequantised_copy(model: nn.Module, dense: nn.Module) -> nn.Module:
    """``dense`` (the same architecture, unquantised) with every quantised layer of ``model`` replaced by its
    dequantised matrix in dense's dtype: what the quantised model computes, through cuBLAS. New Parameters,
    so a head tied to the embedding is untied rather than overwritten."""
    dtype = next(dense.parameters()).dtype
    layers = dict(dense.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            w = m.dequantized_weight(dtype)
        elif isinstance(m, TernaryLinear):
            w = m.dequantised_weight(dtype)
        else:
            continue
        layers[name].weight = nn.Parameter(w, requires_grad=False)
    return dense


def step_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights one decode step reads, split into decoder linears, LM head and the rest (norms).

    Every stored tensor counts once (a tied head is the embedding); an embedding that is not also the head is left
    out: a step reads only its tokens' rows of it."""
    embed = model.model.embed_tokens.weight
    head = model.lm_head
    tied = isinstance(head, nn.Linear) and head.weight is embed
    parts = {"decoder_linears": 0, "lm_head": 0, "other": 0}
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if t.data_ptr() in seen or (t is embed and not tied):
            continue
        seen.add(t.data_ptr())
        owner = name.rsplit(".", 2)[-2]  # "model.layers.0.mlp.up_proj.qweight" -> "up_proj"
        part = ("decoder_linears" if owner in LINEAR_NAMES + FUSED_NAMES else
                "lm_head" if name.startswith("lm_head.") or t is embed else "other")
        parts[part] += t.numel() * t.element_size()
    parts["total"] = sum(parts.values())
    return parts


@torch.no_grad()
def check(model: nn.Module, dense: nn.Module, device) -> dict:
    """The quantised model against its dequantised twin at each of CHECK_SIZES tokens: every quantised layer's output
    against F.linear of the same input with the dequantised weight (the residual stream, mostly the embedding here,
    would hide a layer that is off by 10% in the logits), and the logits."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, max(CHECK_SIZES)), generator=gen).to(device)
    dense_layers = dict(dense.named_modules())
    errs: list[float] = []

    def compare(name):
        def hook(module, inputs, output):
            want = nn.functional.linear(inputs[0], dense_layers[name].weight).float()
            errs.append(float((output.float() - want).norm() / want.norm()))
        return hook

    handles = [m.register_forward_hook(compare(name)) for name, m in model.named_modules()
               if isinstance(m, (QuantLinear, TernaryLinear))]
    out = {}
    try:
        for m in CHECK_SIZES:
            errs.clear()
            got, want = model(ids[:, :m]).float(), dense(ids[:, :m]).float()
            out[f"layer_rel_err_max_m{m}"] = max(errs)
            out[f"logits_rel_err_m{m}"] = float((got - want).norm() / want.norm())
            out[f"top1_agree_m{m}"] = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    finally:
        for h in handles:
            h.remove()
    return out


def greedy_tokens(model: nn.Module, prompt: list[int], eager: bool) -> list[int]:
    cfg = EngineConfig(num_blocks=len(prompt) // 16 + 8, block_size=16, max_num_seqs=1, enforce_eager=eager)
    engine = LLMEngine(model, cfg, eos_token_ids=())
    seq = engine.add_request(prompt, SamplingParams(max_tokens=GRAPH_TOKENS, ignore_eos=True))
    engine.run()
    return list(seq.output_token_ids)


def set_backend(model: nn.Module, backend: str) -> None:
    for m in model.modules():
        if isinstance(m, (QuantLinear, TernaryLinear)):
            m.backend = backend


def run_scheme(scheme: str, args, device, dtype, copy_gbps, batches: list[int]) -> tuple[list[dict], dict]:
    shape = QUICK if args.quick else None
    # the CPU smoke run checks the kernels themselves (interpreter), then runs the engine on the torch reference:
    # the interpreter would take minutes over the steps, and CPU timings mean nothing anyway
    fused = getattr(args, "fused", False)
    model = make_model(args.quick, device, dtype, shape)
    if fused:  # before quantising: the fused projections are what gets quantised
        fuse_model(model)  # "auto": the kernels on the GPU; the quick run's CPU engine takes their references
    model = apply_scheme(model, scheme, args.lm_head, "triton" if args.quick else "auto")
    checks = {}
    if scheme not in DENSE:
        twin = make_model(args.quick, device, dtype, shape)
        dense = dequantised_copy(model, fuse_model(twin) if fused else twin)
        checks = check(model, dense, device)
        del dense
        free_gpu_memory()
    if args.quick:
        set_backend(model, "torch")
    prompt = torch.randint(0, model.config.vocab_size, (32,), generator=torch.Generator().manual_seed(2)).tolist()
    graphs, eager = greedy_tokens(model, prompt, eager=False), greedy_tokens(model, prompt, eager=True)
    checks.update(graph_tokens=graphs, eager_tokens=eager, graph_tokens_match_eager=graphs == eager)
    bad = {k: v for k, v in checks.items() if k.startswith("layer_rel_err") and not v <= MAX_REL_ERR}
    if bad or graphs != eager:
        raise RuntimeError(f"{scheme}: the quantised engine is wrong, not timing it: {bad or ''} "
                           f"{'' if graphs == eager else f'graph tokens {graphs} != eager tokens {eager}'}")
    print(scheme, checks, flush=True)
    parts = step_bytes(model)
    args.batches = ",".join(map(str, batches))  # decode_rows reads the comma-separated string
    rows = decode_rows(model, args, device, copy_gbps, weight_bytes=parts["total"],
                       graph_modes=(True, False) if args.eager else (True,))
    for r in rows:
        r.update(scheme=scheme, fused=fused, tok_s=r["batch"] / r["step_ms"] * 1e3,
                 **{f"{k}_bytes": v for k, v in parts.items()})
    del model
    free_gpu_memory()
    return rows, checks


def add_ratios(rows: list[dict]) -> None:
    """Each row's tokens/s and floor against the dense model's at the same batch and graph mode (None without one)."""
    base = {(r["batch"], r["cuda_graphs"]): r for r in rows if r["scheme"] in DENSE}
    for r in rows:
        b = base.get((r["batch"], r["cuda_graphs"]))
        r["ratio_to_dense"] = r["tok_s"] / b["tok_s"] if b else None
        r["floor_ratio_to_dense"] = b["floor_ms"] / r["floor_ms"] if b and r["floor_ms"] else None


def run(args) -> dict:
    from labkit.bench import record

    schemes, batches = _parse(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.quick:
        args.context, args.steps = min(args.context, 32), min(args.steps, 2)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[getattr(args, "activations", "bf16")]
    dtype = dtype if device.type == "cuda" else torch.float32
    if dtype == torch.float16:
        schemes = ["fp16" if s == "bf16" else s for s in schemes]
    copy_gbps = record.copy_bandwidth_gbps() if device.type == "cuda" else None
    rows, checks = [], {}
    for scheme in schemes:
        scheme_rows, checks[scheme] = run_scheme(scheme, args, device, dtype, copy_gbps, batches)
        rows += scheme_rows
    add_ratios(rows)
    for r in rows:
        print({k: r[k] for k in ("scheme", "batch", "cuda_graphs", "step_ms", "tok_s", "floor_ms", "ratio_to_dense")},
              flush=True)
    c = QUICK if args.quick else LLAMA_1B
    int4 = next((r for r in rows if r["scheme"] == "int4_g128" and r["batch"] == 1 and r["ratio_to_dense"]), None)
    target = {"int4_g128_batch1_ratio_to_dense": int4["ratio_to_dense"] if int4 else None, "wanted": TARGET,
              "floor_ratio": int4["floor_ratio_to_dense"] if int4 else None}
    return {"shapes": {"model": "tiny (CPU smoke run)" if args.quick else "Llama-3.2-1B shape, random weights",
                       "dtype": str(dtype), "dense": next((s for s in schemes if s in DENSE), None),
                       "hidden_size": c["hidden_size"],
                       "num_hidden_layers": c["num_hidden_layers"], "vocab_size": c["vocab_size"],
                       "decode_context": args.context, "steps": args.steps, "batches": batches, "schemes": schemes,
                       "lm_head": args.lm_head, "embedding": str(dtype),
                       "quantised": "decoder linears (q, k, v, o, gate, up, down)"
                                    + ("" if args.lm_head == "bf16" else f" and the LM head ({args.lm_head})")},
            "copy_gbps": copy_gbps, "rows": rows, "checks": checks, "target": target}
