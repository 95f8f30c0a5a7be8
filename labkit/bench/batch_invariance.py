"""Batch invariance of the engine: one target request greedily alone, co-batched and chunked, in both modes.

For each mode (default / ``EngineConfig(batch_invariant=True)``) and dtype:

    co-batched   the target with 1..max_others random requests of random lengths, queued before it or joining
                 at random steps, ``--trials`` times on one engine
    chunked      the target under each ``--chunks`` prefill budget, with a few random others
    decode       decode tokens/s of a batch of ``--decode-batch`` requests: what the invariant mode costs

and reports the distinct completions (the alone run's included), the first divergent token position, the
largest |logit - alone logit| (up to the divergence) and how many runs had bitwise-identical logits
(labkit.batch_invariant.compare).

GPU (records data/bench/batch_invariance.json, < 4 min on an H200): bf16, the engine benchmark's Llama-3.2-1B
shape with random weights:  ``python -m labkit.bench batch_invariance``
CPU: ``python -m labkit.bench batch_invariance --quick --out /tmp/bi.json`` (the shipped model, fp32 and bf16).
"""
from __future__ import annotations

import random

import numpy as np
import torch

from labkit import batch_invariant as bi
from labkit.bench.engine import free_gpu_memory, kv_blocks_for, make_model


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="the shipped model on the CPU, small sizes")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-others", type=int, default=31)
    parser.add_argument("--max-other-len", type=int, default=512)
    parser.add_argument("--chunks", default="32,128,512")
    parser.add_argument("--decode-batch", default="1,8,32,64")
    parser.add_argument("--decode-context", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)


def experiment(model, args, batch_invariant: bool, num_blocks: int):
    """(the alone completion, a summary row for co-batched and one for chunked)."""
    rng = random.Random(0)
    vocab = model.config.vocab_size
    target = [rng.randrange(vocab) for _ in range(args.prompt_len)]
    engine = bi.make_engine(model, batch_invariant=batch_invariant, num_blocks=num_blocks)
    alone = bi.complete(engine, target, max_tokens=args.max_tokens)
    batched = [bi.complete(engine, target, bi.random_others(rng, vocab, rng.randint(1, args.max_others),
                                                            args.max_other_len, args.max_tokens // 2),
                           args.max_tokens) for _ in range(args.trials)]
    del engine
    free_gpu_memory()  # one engine's KV pool at a time
    chunked = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        engine = bi.make_engine(model, batch_invariant=batch_invariant, num_blocks=num_blocks,
                                max_num_batched_tokens=chunk)
        others = bi.random_others(rng, vocab, 3, args.max_other_len, 4)
        chunked.append(bi.complete(engine, target, others, args.max_tokens))
        del engine
        free_gpu_memory()
    mode = "batch_invariant" if batch_invariant else "default"
    return alone, [{"mode": mode, "experiment": "co-batched", **bi.compare(alone, batched)},
            {"mode": mode, "experiment": "chunked", "chunks": args.chunks, **bi.compare(alone, chunked)}]


def decode_speed(model, args, batch_invariant: bool, batch: int, device) -> dict:
    """Decode tokens/s of ``batch`` requests with ``--decode-context`` prompt tokens each (measured steps only)."""
    from labkit.sampling import SamplingParams

    bs = 16
    blocks = batch * -(-(args.decode_context + args.decode_steps + 1) // bs) + 8
    engine = bi.make_engine(model, batch_invariant=batch_invariant, num_blocks=blocks, max_num_seqs=batch,
                            max_num_batched_tokens=max(2048, args.decode_context))
    gen = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        prompt = torch.randint(0, model.config.vocab_size, (args.decode_context,), generator=gen).tolist()
        engine.add_request(prompt, SamplingParams(max_tokens=args.decode_steps + 1, ignore_eos=True))
    engine.runner.capture_all(batch)  # graph capture (and kernel compiles) before anything is timed
    engine.run()
    decode = [h for h in engine.history if h.num_prefill_tokens == 0 and h.num_decode_tokens == batch]
    seconds = [h.seconds for h in decode]
    del engine
    free_gpu_memory()
    return {"mode": "batch_invariant" if batch_invariant else "default", "experiment": "decode", "batch": batch,
            "decode_steps": len(decode), "step_ms_p50": float(np.median(seconds)) * 1e3,
            "decode_tok_s": batch * len(decode) / sum(seconds)}


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick or device.type == "cpu":
        from labkit.checkpoint import load_default_model

        args.trials, args.prompt_len, args.max_tokens = min(args.trials, 6), 37, 8
        args.max_others, args.max_other_len, args.chunks = 7, 50, "7,16"
        args.decode_batch, args.decode_context, args.decode_steps = "1,8", 32, 6
        setups = [(dt, load_default_model(dtype=dt, device=device)[0], "shipped model (data/model)")
                  for dt in (torch.float32, torch.bfloat16)]
    else:
        setups = [(torch.bfloat16, make_model(False, device, torch.bfloat16), "Llama-3.2-1B shape, random weights")]
    rows = []
    for dtype, model, name in setups:
        blocks = kv_blocks_for(model, device, 0.25, 16, fallback=512)
        alone = {}
        for invariant in (False, True):
            alone[invariant], summary = experiment(model, args, invariant, blocks)
            for row in summary:
                rows.append({"dtype": str(dtype), **row})
                print(rows[-1], flush=True)
            for batch in [int(b) for b in args.decode_batch.split(",")]:
                rows.append({"dtype": str(dtype), **decode_speed(model, args, invariant, batch, device)})
                print(rows[-1], flush=True)
        # the kernels' sanity check: alone, the two modes compute the same function up to rounding
        a, b = alone[False], alone[True]
        n = bi.first_divergence(a.tokens, b.tokens)
        n = len(a.tokens) if n is None else n + 1
        rows.append({"dtype": str(dtype), "mode": "invariant_vs_default", "experiment": "alone",
                     "first_divergent_token": bi.first_divergence(a.tokens, b.tokens),
                     "max_abs_logit_diff": (a.logits[:n] - b.logits[:n]).abs().max().item(),
                     "logit_scale": a.logits.abs().max().item()})
        print(rows[-1], flush=True)
        c = model.config
        shapes = {"model": name, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                  "vocab_size": c.vocab_size, "head_dim": c.head_dim}
        del model
    return {"device_kind": device.type, "shapes": shapes,
            "settings": {k: getattr(args, k) for k in ("trials", "prompt_len", "max_tokens", "max_others",
                                                        "max_other_len", "chunks", "decode_context", "decode_steps")},
            "kv_split": bi.KV_SPLIT, "rows": rows}
