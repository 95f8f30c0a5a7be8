"""What does weight quantisation cost in quality? One table: held-out perplexity and a greedy sample.

    python -m labkit.quality [--max-tokens 16384] [--sample-tokens 32]

Every variant is the shipped model (``labkit.checkpoint.load_default_model()``) with its linears stored
another way; the embedding, the norms and the (tied) lm_head stay in fp32, as weight-only schemes
usually keep them, and activations stay fp32, so the table isolates the error of the stored weights:

    fp32        the reference
    bf16        every weight and activation in bfloat16 (8 bits of mantissa instead of 24)
    int8        labkit.quant int8, one scale per output row
    int4_gG     labkit.quant int4, one (scale, zero) per G weights; down_proj's 688 inputs are zero-
                padded to a multiple of G (``pad=True``)

Perplexity is :func:`labkit.evaluate.mean_loss` over the first ``--max-tokens`` tokens of the held-out
Austen chapters (the same stream and windows as ``python -m labkit.evaluate``; default 16,384, the
subset the model card quotes: about 40 s for all six variants on 2 CPU cores). The sample is greedy decoding of
``--sample-tokens`` tokens after a fixed prompt; "same" counts the tokens that match fp32's before the
first difference. On the CPU the quantised linears run the plain-torch reference (dequantise, then
matmul); on a GPU the Triton kernels.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch

import labkit  # noqa: F401  (CPU/GPU mode first)
from labkit.evaluate import CARD_MAX_TOKENS, encode_split, mean_loss
from labkit.generate import generate
from labkit.quant import quantize_model, weight_bytes

VARIANTS = ("fp32", "bf16", "int8", "int4_g32", "int4_g64", "int4_g128")
PROMPT = "It is a truth universally acknowledged, that"
DEFAULT_MAX_TOKENS = CARD_MAX_TOKENS  # the same 16,384 tokens the model card's perplexity uses


def make_variant(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """A copy of ``model`` stored as ``variant`` (see the module docstring); ``model`` is unchanged."""
    m = copy.deepcopy(model)
    if variant == "fp32":
        return m.float()
    if variant == "bf16":
        return m.to(torch.bfloat16)
    return quantize_model(m, variant, skip=("lm_head",), pad=True)


def quality_table(model, tokenizer, variants=VARIANTS, max_tokens: int = DEFAULT_MAX_TOKENS,
                  sample_tokens: int = 32, prompt: str = PROMPT) -> list[dict]:
    """One row per variant: perplexity, its change against the first variant, linear bytes, greedy sample."""
    ids = encode_split(tokenizer)[: max_tokens + 1]  # +1: the first token is context only
    prompt_ids = tokenizer.encode(prompt)
    rows, ref_tokens, ref_ppl = [], None, None
    for variant in variants:
        start = time.perf_counter()
        m = make_variant(model, variant)
        loss, scored = mean_loss(m, ids)
        tokens = generate(m, prompt_ids, sample_tokens).token_ids
        ref_tokens = tokens if ref_tokens is None else ref_tokens
        ref_ppl = math.exp(loss) if ref_ppl is None else ref_ppl
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        rows.append({"variant": variant, "perplexity": math.exp(loss), "delta_pct": 100 * (math.exp(loss) / ref_ppl - 1),
                     "linear_bytes": weight_bytes(m, skip=("lm_head",))["linears"], "tokens_scored": scored,
                     "sample": tokenizer.decode(tokens), "same_tokens": same, "seconds": time.perf_counter() - start})
        del m
    return rows


def format_table(rows: list[dict], width: int = 100) -> str:
    lines = [f"{'variant':10s} {'linears MB':>10s} {'perplexity':>10s} {'vs fp32':>8s} {'same':>5s}  greedy sample",
             "-" * (50 + width)]
    for r in rows:
        sample = r["sample"].replace("\n", " ")
        sample = sample if len(sample) <= width else sample[: width - 3] + "..."
        lines.append(f"{r['variant']:10s} {r['linear_bytes'] / 1e6:10.2f} {r['perplexity']:10.4g} "
                     f"{r['delta_pct']:+7.2f}% {r['same_tokens']:5d}  {sample}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Perplexity and a greedy sample of the shipped model, quantised each way.")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"score the first N held-out tokens (default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--sample-tokens", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--device", default="cpu", help="cpu (plain-torch dequantisation) or cuda (Triton kernels)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    from labkit.checkpoint import load_default_model

    model, tokenizer = load_default_model()
    source = "shipped model data/model/"
    model = model.to(args.device)
    rows = quality_table(model, tokenizer, args.variants, args.max_tokens, args.sample_tokens)
    print(f"{source}; perplexity over the first {rows[0]['tokens_scored']:,} held-out tokens; "
          f"greedy sample of {args.sample_tokens} tokens after {PROMPT!r}")
    print(format_table(rows))
    print(f"({time.perf_counter() - start:.0f} s on {args.device}; 'same' = tokens equal to fp32's "
          "before the first difference)")


if __name__ == "__main__":
    main()
