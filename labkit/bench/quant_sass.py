"""SASS instructions a weight in the main loop of each weight-only GEMV: the profile behind the speed-ups.

Why. At batch 1 a GEMV must unpack weights as fast as memory delivers them: an H200 at ~4.2 TB/s feeds each of its
132 SMs ~16 bytes a clock, i.e. ~32 int4 or ~64 ternary weights a clock, against 128 instruction issues a clock per
SM (4 schedulers x 32 lanes). So the instructions a weight (one thread's view) bound how close to the byte ratio a
kernel can get. This records, for each labkit GEMV at its default configuration on one Llama-3-8B shape, the SASS
(the machine code the GPU runs) and counts the instructions of its hottest loop per weight a thread handles there.

    kernel                 loop body instructions / weights one thread handles per iteration

The SASS text itself is stored, so the counts can be redone (``loop_instructions``) without a GPU.
GPU: ``python -m labkit.bench quant_sass``.
"""
from __future__ import annotations

import re

import torch

SHAPE = (4096, 14336)  # (n, k): Llama-3-8B's down projection


def _kernels(n: int, k: int):
    """name -> (jit function, launch callable(x), weights one thread handles per loop iteration)."""
    from kernels import quant_matmul as qm
    from kernels import ternary
    from labkit.quant import quantize_tensor
    from labkit.ternary import absmean_ternarise

    torch.manual_seed(0)
    w = (torch.randn(n, k, device="cuda") * 0.02).half()
    q8, q4 = quantize_tensor(w, "int8"), quantize_tensor(w, "int4_g128")
    t, scale = absmean_ternarise(w, "row")
    packed, packed_words, scale = ternary.pack_ternary(t), ternary.pack_ternary_words(t), scale.to(w.device)
    int8_fp32 = dict(qm.INT8_GEMV_CONFIG)
    int8_words = qm.default_config("int8", 1, n, k)
    int4_fp32 = dict(path="gemv", BLOCK_N=4, GROUPS=4, MAGIC=True, PREFETCH=True, num_warps=2)
    int4_words = qm.default_config("int4", 1, n, k, 128)
    tern_v1 = ternary._config(1, n, k)
    tern_words = ternary.words_config(1, n, k)
    per_thread = lambda cfg, weights: weights / (32 * cfg.get("num_warps", 4))  # noqa: E731
    return {
        "int8 fp32 GEMV": (qm._int8_gemv_kernel, lambda x: qm.int8_matmul(x, q8.qweight, q8.scales, config=int8_fp32),
                           per_thread(int8_fp32, int8_fp32["BLOCK_N"] * int8_fp32["BLOCK_K"]), int8_fp32),
        "int8 WORDS": (qm._int8_gemv_words_kernel, lambda x: qm.int8_matmul(x, q8.qweight, q8.scales, config=int8_words),
                       per_thread(int8_words, int8_words["BLOCK_N"] * int8_words["BLOCK_K"]), int8_words),
        "int4 g128 fp32 GEMV": (qm._int4_gemv_kernel,
                                lambda x: qm.int4_matmul(x, q4.qweight, q4.scales, q4.zeros, 128, config=int4_fp32),
                                per_thread(int4_fp32, int4_fp32["BLOCK_N"] * int4_fp32["GROUPS"] * 128), int4_fp32),
        "int4 g128 WORDS": (qm._int4_gemv_words_kernel,
                            lambda x: qm.int4_matmul(x, q4.qweight, q4.scales, q4.zeros, 128, config=int4_words),
                            per_thread(int4_words, int4_words["BLOCK_N"] * int4_words["GROUPS"] * 128), int4_words),
        "ternary v1": (ternary._ternary_matmul_kernel, lambda x: ternary.ternary_matmul(x, packed, scale),
                       per_thread(tern_v1, tern_v1["BLOCK_N"] * tern_v1["BLOCK_KB"] * 4), tern_v1),
        "ternary words": (ternary._ternary_gemv_words_kernel,
                          lambda x: ternary.ternary_matmul_words(x, packed_words, scale, tern_words),
                          per_thread(tern_words, tern_words["BLOCK_N"] * tern_words["BLOCK_KB"] * 4), tern_words),
    }


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_BRANCH_TARGET = re.compile(r"\bBRA\b[^;]*?(0x[0-9a-f]+|\.L_x_\d+)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def loop_instructions(sass: str) -> int:
    """Instructions in the largest loop body of SASS text: from a backward branch's target to the branch.

    Handles both spellings of a branch target: an address (``BRA 0x1d0``, cuobjdump) or a label
    (``BRA `(.L_x_3)``, nvdisasm / Triton's rewrite); instructions are the lines with an address comment."""
    addrs, labels, branches = [], {}, []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(addrs)
            continue
        ins = _INSTRUCTION.search(line)
        if not ins:
            continue
        addrs.append(int(ins.group(1), 16))
        if ins.group(3).startswith("BRA"):
            target = _BRANCH_TARGET.search(line)
            if target:
                branches.append((len(addrs) - 1, target.group(1)))
    index = {a: i for i, a in enumerate(addrs)}
    body = 0
    for at, target in branches:
        start = labels.get(target) if target.startswith(".L") else index.get(int(target, 16))
        if start is not None and start <= at:
            body = max(body, at - start + 1)
    return body


def run(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("quant_sass compiles GPU kernels; on the CPU recount the stored SASS with loop_instructions")
    n, k = SHAPE
    rows = []
    x = torch.randn(1, k, device="cuda").half()
    for name, (jit_fn, launch, weights, cfg) in _kernels(n, k).items():
        launch(x)
        compiled = [c for cache in jit_fn.device_caches.values() for c in cache[0].values()]
        sass = compiled[-1].asm.get("sass", "") if compiled else ""
        loop = loop_instructions(sass)
        rows.append({"kernel": name, "config": cfg, "weights_per_thread_iteration": weights,
                     "loop_instructions": loop, "instructions_per_weight": loop / weights if loop else None,
                     "sass": sass})
        print(f"{name:22s} {loop:5d} instructions / {weights:6.0f} weights = "
              f"{(loop / weights if loop else float('nan')):.2f} a weight  {cfg}", flush=True)
    return {"shapes": {"n": n, "k": k, "m": 1, "x": "fp16"}, "rows": rows}
