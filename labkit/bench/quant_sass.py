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
    from kernels import quant_matmul_int4_interleaved as interleaved
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
    int4_inter = dict(interleaved.DEFAULT_CONFIG)
    words4, s4, z4 = interleaved.interleave_int4(q4.qweight, q4.scales, q4.zeros)
    tern_v1 = ternary._config(1, n, k)
    tern_words = ternary.words_config(1, n, k)
    per_thread = lambda cfg, weights: weights / (32 * cfg.get("num_warps", 4))  # noqa: E731
    return {
        "int8 fp32 GEMV": (qm._int8_gemv_kernel, lambda x: qm.int8_matmul(x, q8.qweight, q8.scales, config=int8_fp32),
                           per_thread(int8_fp32, int8_fp32["BLOCK_N"] * int8_fp32["BLOCK_K"]), int8_fp32),
        "int8 WORDS": (qm._int8_gemv_words_kernel,
                       lambda x: qm.int8_matmul(x, q8.qweight, q8.scales, config=int8_words),
                       per_thread(int8_words, int8_words["BLOCK_N"] * int8_words["BLOCK_K"]), int8_words),
        "int4 g128 fp32 GEMV": (qm._int4_gemv_kernel,
                                lambda x: qm.int4_matmul(x, q4.qweight, q4.scales, q4.zeros, 128, config=int4_fp32),
                                per_thread(int4_fp32, int4_fp32["BLOCK_N"] * int4_fp32["GROUPS"] * 128), int4_fp32),
        "int4 g128 WORDS": (qm._int4_gemv_words_kernel,
                            lambda x: qm.int4_matmul(x, q4.qweight, q4.scales, q4.zeros, 128, config=int4_words),
                            per_thread(int4_words, int4_words["BLOCK_N"] * int4_words["GROUPS"] * 128), int4_words),
        "int4 g128 interleaved": (interleaved._int4_gemv_interleaved_kernel,
                                  lambda x: interleaved.int4_matmul_interleaved(x, words4, s4, z4, n, 128,
                                                                                config=int4_inter),
                                  per_thread(int4_inter, int4_inter["BLOCKS"] * 4 * int4_inter["GROUPS"] * 128),
                                  int4_inter),
        "ternary v1": (ternary._ternary_matmul_kernel, lambda x: ternary.ternary_matmul(x, packed, scale),
                       per_thread(tern_v1, tern_v1["BLOCK_N"] * tern_v1["BLOCK_KB"] * 4), tern_v1),
        "ternary words": (ternary._ternary_gemv_words_kernel,
                          lambda x: ternary.ternary_matmul_words(x, packed_words, scale, tern_words),
                          per_thread(tern_words, tern_words["BLOCK_N"] * tern_words["BLOCK_KB"] * 4), tern_words),
    }


_INSTRUCTION = re.compile(r"(?:/\*([0-9a-f]{4,})\*/\s+|^[0-9a-fA-F-]{2}:[^\t]*\t)(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_BRANCH_TARGET = re.compile(r"\bBRA\b[^;]*?(0x[0-9a-f]+|\.L_x_\d+|\bLBB\w+)")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|LBB\w+):")


def _listing(sass: str) -> tuple[list[tuple[int | None, str, str]], dict[str, int]]:
    """([(address or None, opcode, line)] of the instructions, {label: index of the next instruction})."""
    instructions, labels = [], {}
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        ins = _INSTRUCTION.search(line)
        if ins:
            instructions.append((int(ins.group(1), 16) if ins.group(1) else None, ins.group(3), line))
    return instructions, labels


def hottest_loop(sass: str) -> list[str]:
    """The opcodes of the largest loop body of SASS text: from a backward branch's target to the branch.

    Reads the three spellings seen: cuobjdump's (``/*0050*/ @P0 BRA 0x20 ;``), nvdisasm's labels
    (``BRA `(.L_x_3)``) and Triton's ``asm["sass"]`` (``--:-:-:-:6<TAB>@!P0 BRA LBB1;`` with ``LBB1:`` lines)."""
    instructions, labels = _listing(sass)
    index = {a: i for i, (a, _, _) in enumerate(instructions) if a is not None}
    best = (0, 0)
    for at, (_, op, line) in enumerate(instructions):
        target = _BRANCH_TARGET.search(line) if op.startswith("BRA") else None
        if not target:
            continue
        name = target.group(1)
        start = index.get(int(name, 16)) if name.startswith("0x") else labels.get(name)
        if start is not None and start <= at and at - start + 1 > best[1] - best[0]:
            best = (start, at + 1)
    return [op for _, op, _ in instructions[best[0]:best[1]]]


def loop_instructions(sass: str) -> int:
    """Instructions in the largest loop body of SASS text (see hottest_loop)."""
    return len(hottest_loop(sass))


def opcode_mix(ops: list[str]) -> dict[str, int]:
    """{opcode family: count}, most frequent first: ``LDG.E.128.CONSTANT`` counts as LDG."""
    mix: dict[str, int] = {}
    for op in ops:
        family = op.split(".")[0]
        mix[family] = mix.get(family, 0) + 1
    return dict(sorted(mix.items(), key=lambda kv: -kv[1]))


def run(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("quant_sass compiles GPU kernels; on the CPU recount the stored SASS with loop_instructions")
    n, k = SHAPE
    rows = []
    x = torch.randn(1, k, device="cuda").half()
    for name, (jit_fn, launch, weights, cfg) in _kernels(n, k).items():
        launch(x)
        compiled = [c for cache in jit_fn.device_caches.values() for c in cache[0].values()]
        try:  # asm is a dict that disassembles the cubin on first access of "sass" (get() would skip that)
            sass = compiled[-1].asm["sass"] if compiled else ""
        except Exception as e:  # cuobjdump missing, or a Triton without the lazy "sass" entry
            print(f"{name}: no SASS ({str(e)[:160]})")
            sass = ""
        ops = hottest_loop(sass)
        loop = len(ops)
        rows.append({"kernel": name, "config": cfg, "weights_per_thread_iteration": weights,
                     "loop_instructions": loop, "instructions_per_weight": loop / weights if loop else None,
                     "loop_mix": opcode_mix(ops), "sass": sass})
        print(f"{name:22s} {loop:5d} instructions / {weights:6.0f} weights = "
              f"{(loop / weights if loop else float('nan')):.2f} a weight  {cfg}", flush=True)
    return {"shapes": {"n": n, "k": k, "m": 1, "x": "fp16"}, "rows": rows}
