"""What does weight quantisation cost in quality? One table: held-out perplexity and a greedy sample.

    python -m labkit.quality [--model DIR|FILE.gguf] [--max-tokens 16384] [--sample-tokens 32] [--out FILE.json]

Every variant is one model (default: the shipped one, ``labkit.checkpoint.load_default_model()``; ``--model``
any directory or GGUF file labkit loads, dequantised to fp32) with its linears stored another way; the
embedding, the norms and the (tied) lm_head stay in fp32, as weight-only schemes usually keep them, and
activations stay fp32, so the table isolates the error of the stored weights:

    fp32           the reference
    bf16           every weight and activation in bfloat16 (8 bits of mantissa instead of 24)
    int8           labkit.quant int8, one scale per output row
    int4_gG        labkit.quant int4, one (scale, integer zero point) per G weights; in_features that G
                   does not divide (the Austen model's 688) are zero-padded (``pad=True``)
    int4_fmin_g32  labkit.quant int4, one (scale, float minimum) per 32 weights: GGUF's Q4_1 grid
    int8_kv        fp32 weights, K and V stored int8 with a scale per token and head (labkit.kv_quant)

Perplexity is :func:`labkit.evaluate.mean_loss` over the first ``--max-tokens`` tokens of the held-out
Austen chapters, tokenised by the model's own tokenizer (the same stream and windows as ``python -m
labkit.evaluate``; default 16,384, the subset the model card quotes: about 40 s for the weight variants
on 2 CPU cores). The sample is greedy decoding of ``--sample-tokens`` tokens after a fixed prompt;
"same" counts the tokens that match fp32's before the first difference. On the CPU the quantised
linears run the plain-torch reference (dequantise, then matmul); on a GPU the Triton kernels.
``--out`` records the rows with their provenance (command, model, torch, CPU, date) as JSON, which
notebook 08 prints for models too large to measure live in CI (:func:`format_recorded`).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import pathlib
import platform
import sys
import time

import torch

import labkit  # noqa: F401  (CPU/GPU mode first)
from labkit.evaluate import CARD_MAX_TOKENS, encode_split, load_or_usage_error, mean_loss, usage_error
from labkit.generate import generate
from labkit.quant import quantize_model, weight_bytes

VARIANTS = ("fp32", "bf16", "int8", "int4_g32", "int4_g64", "int4_g128", "int4_fmin_g32", "int8_kv")
DEFAULT_VARIANTS = ("fp32", "bf16", "int8", "int4_g32", "int4_g64", "int4_g128")
PROMPT = "It is a truth universally acknowledged, that"
DEFAULT_MAX_TOKENS = CARD_MAX_TOKENS  # the same 16,384 tokens the model card's perplexity uses
RECORDED = pathlib.Path(__file__).resolve().parents[1] / "data" / "quality"


def make_variant(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """A copy of ``model`` stored as ``variant`` (see the module docstring); ``model`` is unchanged."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    m = copy.deepcopy(model)
    if variant in ("fp32", "int8_kv"):
        return m.float()
    if variant == "bf16":
        return m.to(torch.bfloat16)
    return quantize_model(m, variant, skip=("lm_head",), pad=True)


def _int8_kv_loss(model, ids: torch.Tensor) -> tuple[float, int]:
    """Mean loss with K and V read from the engine's int8 store (labkit.kv_quant), same windows as mean_loss."""
    from labkit.kv_quant import heldout_perplexities

    return math.log(heldout_perplexities(model, ids, formats=("int8",), batch_size=8)["int8"]), len(ids) - 1


def _int8_kv_sample(model, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens from the engine with an int8 KV store."""
    from labkit.engine import EngineConfig, LLMEngine, SamplingParams

    blocks = -(-(len(prompt_ids) + n) // 16) + 1
    engine = LLMEngine(model, EngineConfig(num_blocks=blocks, block_size=16, kv_cache_dtype="int8"), eos_token_ids=())
    seq = engine.add_request(prompt_ids, SamplingParams(max_tokens=n))
    engine.run()
    return seq.output_token_ids


def quality_table(model, tokenizer, variants=DEFAULT_VARIANTS, max_tokens: int = DEFAULT_MAX_TOKENS,
                  sample_tokens: int = 32, prompt: str = PROMPT) -> list[dict]:
    """One row per variant: perplexity, its change against the first variant, linear bytes, greedy sample."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if isinstance(sample_tokens, bool) or not isinstance(sample_tokens, int) or sample_tokens < 1:
        raise ValueError(f"sample_tokens must be an integer >= 1, got {sample_tokens!r}")
    ids = encode_split(tokenizer)[: max_tokens + 1]  # +1: the first token is context only
    prompt_ids = tokenizer.encode(prompt)
    rows, ref_tokens, ref_ppl = [], None, None
    for variant in variants:
        start = time.perf_counter()
        m = make_variant(model, variant)
        if variant == "int8_kv":
            loss, scored = _int8_kv_loss(m, ids)
            tokens = _int8_kv_sample(m, prompt_ids, sample_tokens)
        else:
            loss, scored = mean_loss(m, ids, batch_size=8)
            tokens = generate(m, prompt_ids, sample_tokens).token_ids
        ref_tokens = tokens if ref_tokens is None else ref_tokens
        ref_ppl = math.exp(loss) if ref_ppl is None else ref_ppl
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
        rows.append({"variant": variant, "perplexity": math.exp(loss),
                     "delta_pct": 100 * (math.exp(loss) / ref_ppl - 1),
                     "linear_bytes": weight_bytes(m, skip=("lm_head",))["linears"], "tokens_scored": scored,
                     "sample": tokenizer.decode(tokens), "same_tokens": same, "seconds": time.perf_counter() - start})
        del m
    return rows


def format_table(rows: list[dict], width: int = 100) -> str:
    lines = [f"{'variant':13s} {'linears MB':>10s} {'perplexity':>10s} {'vs fp32':>8s} {'same':>5s}  greedy sample",
             "-" * (53 + width)]
    for r in rows:
        sample = r["sample"].replace("\n", " ")
        sample = sample if len(sample) <= width else sample[: width - 3] + "..."
        lines.append(f"{r['variant']:13s} {r['linear_bytes'] / 1e6:10.2f} {r['perplexity']:10.4g} "
                     f"{r['delta_pct']:+7.2f}% {r['same_tokens']:5d}  {sample}")
    return "\n".join(lines)


def format_recorded(path: str | pathlib.Path) -> str:
    """A table ``--out`` wrote, with where and how it was measured."""
    rec = json.loads(pathlib.Path(path).read_text())
    p = rec["provenance"]
    head = (f"{rec['model']}; perplexity over the first {rec['rows'][0]['tokens_scored']:,} held-out tokens; "
            f"greedy sample of {rec['sample_tokens']} tokens after {rec['prompt']!r}\n"
            f"recorded {p['date'][:10]} on {p['device']} (torch {p['torch']}) by `{p['command']}`")
    return head + "\n" + format_table(rec["rows"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Perplexity and a greedy sample of a model, quantised each way.")
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="a model directory or .gguf file (default: the shipped model, data/model)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"score the first N held-out tokens (default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--sample-tokens", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--device", default="cpu", help="cpu (plain-torch dequantisation) or cuda (Triton kernels)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write the table, with provenance, as JSON")
    args = parser.parse_args(argv)
    if args.max_tokens < 1:
        usage_error(parser, f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.sample_tokens < 1:
        usage_error(parser, f"--sample-tokens must be >= 1, got {args.sample_tokens}")
    if args.out is not None and not args.out.parent.is_dir():
        usage_error(parser, f"--out {args.out}: the folder {args.out.parent} does not exist")
    start = time.perf_counter()
    from labkit.checkpoint import DEFAULT_MODEL_DIR

    model_path = args.model or DEFAULT_MODEL_DIR
    model, tokenizer = load_or_usage_error(parser, model_path, args.device)
    source = "shipped model data/model/" if args.model is None else f"{model_path.name}"
    rows = quality_table(model, tokenizer, args.variants, args.max_tokens, args.sample_tokens)
    print(f"{source}; perplexity over the first {rows[0]['tokens_scored']:,} held-out tokens; "
          f"greedy sample of {args.sample_tokens} tokens after {PROMPT!r}")
    print(format_table(rows))
    seconds = time.perf_counter() - start
    print(f"({seconds:.0f} s on {args.device}; 'same' = tokens equal to fp32's before the first difference)")
    if args.out is not None:
        device = (torch.cuda.get_device_name() if str(args.device).startswith("cuda")
                  else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
        command = "python -m labkit.quality " + " ".join(sys.argv[1:] if argv is None else argv)
        record = {"model": source, "prompt": PROMPT, "sample_tokens": args.sample_tokens, "rows": rows,
                  "provenance": {"command": command,
                                 "device": device, "torch": torch.__version__, "seconds": round(seconds, 1),
                                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}}
        args.out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
