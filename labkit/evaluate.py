"""Held-out perplexity of a model directory on the Austen held-out chapters.

    python -m labkit.evaluate [--model data/model] [--max-tokens N] [--device cpu]
    python -m labkit.evaluate --write-card      # data/model/README.md: these numbers + the training log

The held-out text (``data/austen/heldout.txt.gz``) is tokenised as one stream and cut into
non-overlapping windows of the model's context length; every token after the first is scored
with the context its window gives it:

    ids:    t0 t1 ... t511 | t512 ... t1023 | ...
    window:  x = ids[i : i+512],  y = ids[i+1 : i+513]     (i = 0, 512, 1024, ...)

perplexity = exp(mean cross-entropy over all scored tokens), in fp32. ``--max-tokens N`` scores
only the first N tokens of the stream (the model card says which N its figure uses).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch
import torch.nn.functional as F

from labkit.checkpoint import DEFAULT_MODEL_DIR
from labkit.corpus import AUSTEN_DIR, load_text

# What the model card quotes, and what a CPU reproduces in well under a minute on 2 cores.
CARD_MAX_TOKENS = 16384


def encode_split(tokenizer, split: str = "heldout") -> torch.Tensor:
    """The whole split as one 1-D tensor of token ids."""
    return torch.tensor(tokenizer.encode(load_text(split)), dtype=torch.long)


def windows(ids: torch.Tensor, ctx: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping (x, y) windows of up to ``ctx`` tokens: y is x shifted by one. The last may be shorter."""
    out = []
    for start in range(0, len(ids) - 1, ctx):
        end = min(start + ctx, len(ids) - 1)  # the last target is the stream's last token
        out.append((ids[start:end], ids[start + 1:end + 1]))
    return out


@torch.no_grad()
def mean_loss(model, ids: torch.Tensor, ctx: int | None = None, batch_size: int = 8,
              autocast_dtype: torch.dtype | None = None, cache_factory=None) -> tuple[float, int]:
    """(mean next-token cross-entropy in nats, tokens scored) over ``ids`` cut into windows."""
    ctx = ctx or model.config.max_position_embeddings
    device = next(model.parameters()).device
    pieces = windows(ids, ctx)
    total, count = 0.0, 0
    for start in range(0, len(pieces), batch_size):
        group = pieces[start:start + batch_size]
        by_len = {}  # equal-length windows batch together (only the last window can be shorter)
        for x, y in group:
            by_len.setdefault(len(x), []).append((x, y))
        for same in by_len.values():
            x = torch.stack([p[0] for p in same]).to(device)  # (B, T)
            y = torch.stack([p[1] for p in same]).to(device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(x, cache=cache_factory() if cache_factory else None)  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            total += float(loss)
            count += y.numel()
    return total / count, count


def load_for_evaluation(model_dir: str | pathlib.Path, device: str = "cpu"):
    """(model, tokenizer) in fp32, or a ValueError / FileNotFoundError saying what the directory lacks."""
    from labkit.checkpoint import load_pretrained

    model, tokenizer = load_pretrained(model_dir, dtype=torch.float32, device=device)
    if tokenizer is None:
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json: perplexity needs the model's own tokenizer; "
                                "save_pretrained(model, dir, tokenizer=tokenizer) writes it next to the weights")
    return model, tokenizer


def evaluate(model_dir: str | pathlib.Path = DEFAULT_MODEL_DIR, max_tokens: int | None = CARD_MAX_TOKENS,
             device: str = "cpu", loaded=None) -> dict:
    """Held-out perplexity of ``model_dir`` (a directory or a .gguf file) in fp32 on the first ``max_tokens``
    tokens (None: all). ``loaded``: its (model, tokenizer) if already loaded."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be an integer >= 1, or None for every held-out token; got {max_tokens!r}")
    if str(device).startswith("cuda"):  # fp32 means fp32: no TF32 matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model, tokenizer = loaded or load_for_evaluation(model_dir, device)
    ids = encode_split(tokenizer)
    heldout_tokens = len(ids)
    if max_tokens:
        ids = ids[:max_tokens + 1]  # +1: the first token is context only
    start = time.perf_counter()
    loss, scored = mean_loss(model, ids)
    return {"perplexity": math.exp(loss), "loss": loss, "tokens_scored": scored,
            "heldout_tokens": heldout_tokens, "max_tokens": max_tokens, "seconds": time.perf_counter() - start,
            "device": device, "threads": torch.get_num_threads()}


def _args_without_out(command: str) -> list[str]:
    words = command.split()[3:]  # drop "python -m labkit.train"
    return [w for i, w in enumerate(words) if w != "--out" and (i == 0 or words[i - 1] != "--out")]


def unigram_perplexity(train_ids: torch.Tensor, target_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of a model that ignores context: token frequencies of the train split, add-one smoothed."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-float(logp[target_ids].mean()))


SAMPLE_PROMPTS = ("It is a truth universally acknowledged", "Mr. Darcy looked at Emma and said,",
                  "The weather was so fine that")


def write_card(model_dir: pathlib.Path = DEFAULT_MODEL_DIR, sample_tokens: int = 60) -> str:
    """Write ``model_dir/README.md`` from its ``training_log.json``, the corpus manifest and live CPU
    measurements (perplexity, unigram baseline, greedy samples). Every number comes from a file or a run."""
    from labkit.checkpoint import load_pretrained
    from labkit.generate import generate
    from labkit.kv_cache import ContiguousCache

    model_dir = pathlib.Path(model_dir)
    log = json.loads((model_dir / "training_log.json").read_text())
    manifest = json.loads((AUSTEN_DIR / "manifest.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    r = evaluate(model_dir, CARD_MAX_TOKENS, "cpu")
    model, tok = load_pretrained(model_dir)
    held = encode_split(tok)
    unigram = unigram_perplexity(encode_split(tok, "train"), held[1:CARD_MAX_TOKENS + 1], tok.vocab_size)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = tok.encode(prompt)
        g = generate(model, ids, sample_tokens, cache=ContiguousCache(model.config, 1, len(ids) + sample_tokens))
        samples.append((prompt, tok.decode(g.token_ids)))
    src, a = manifest["source"], log["args"]
    gpu = log["eval_fp32"]
    sweep = log.get("sweep", {})
    schedule = f"over {a['steps']:,} steps" if a["steps"] else f"on the clock (budget {a['minutes']:g} min)"

    def sweep_table(runs: dict, chosen: str | None) -> str:
        rows = [f"| {name}{' (shipped)' if name == chosen else ''} | `{' '.join(_args_without_out(r['command']))}` "
                f"| {r['steps']} | {r['best_epochs']:.1f} | {r['heldout_perplexity_fp32']:.2f} | {r['stopped_by']} |"
                for name, r in runs.items()]
        return ("| run | arguments | steps | best epoch | held-out ppl (fp32, all) | stopped by |\n"
                "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
    curve = log["curve"]
    shown = curve[:: max(1, len(curve) // 12)]  # about a dozen rows, and always the last evaluation
    shown += [] if shown[-1] is curve[-1] else [curve[-1]]
    curve_rows = "\n".join(f"| {c['step']} | {c.get('epochs', 0):.1f} | {c['seconds']:.0f} | {c.get('train_loss', float('nan')):.3f} "
                           f"| {c['heldout_loss']:.3f} |" for c in shown)
    n_params = model.num_parameters
    card = f"""# labkit's default model: a {n_params / 1e6:.1f}M-parameter Llama trained on Jane Austen

The small model every notebook loads (`labkit.checkpoint.load_default_model()`). It is a real Llama-family
checkpoint in Hugging Face format (`config.json`, `model.safetensors` in bf16, `tokenizer.json`), so
`transformers.LlamaForCausalLM.from_pretrained` reads it too. It writes Austen-flavoured English; it
knows nothing else. This card is written by `python -m labkit.evaluate --write-card` from
`training_log.json` (the training run's own log) and live CPU measurements.

## Corpus
- Jane Austen's six novels as packaged in Debian's `{src['package']}` {src['version']} (`{src['deb']}`,
  sha256 `{src['sha256'][:16]}...`), read from its R lazy-load database by `labkit/corpus.py` (no R needed).
- Licence: {src['licence']}.
- Split: {manifest['split']}
- Train: {manifest['train_chars']:,} characters, {log['train_tokens']:,} tokens.
  Held-out: {manifest['heldout_chars']:,} characters, {log['heldout_tokens']:,} tokens
  ({sum(n['heldout_chapters'] for n in manifest['novels'].values())} chapters).
- Rebuild: `python -m labkit.corpus` (downloads the .deb with `apt-get download`), or offline
  `python -m labkit.corpus --deb {src['deb']}`.

## Tokenizer
Byte-level BPE (GPT-2 style pre-tokenizer; any UTF-8 text encodes), {tok.vocab_size} tokens, learnt
with the `tokenizers` library on the train split only: `python -m labkit.train --tokenizer`.
Token 0, `<|endoftext|>`, separates the novels and is the model's `eos_token_id`. There is no BOS token.

## Architecture
| | |
| --- | --- |
| family | Llama (`{config['architectures'][0]}`, model_type `{config['model_type']}`) |
| parameters | {n_params:,} (embeddings tied with the LM head) |
| layers | {config['num_hidden_layers']} |
| hidden size | {config['hidden_size']} |
| attention | {config['num_attention_heads']} query heads, {config['num_key_value_heads']} KV heads (GQA, groups of {config['num_attention_heads'] // config['num_key_value_heads']}), head_dim {config['head_dim']}, RoPE theta {config['rope_theta']:g} |
| MLP | SwiGLU, intermediate size {config['intermediate_size']} |
| context | {config['max_position_embeddings']} tokens |
| norm | RMSNorm, eps {config['rms_norm_eps']:g} |
| KV cache per token | {2 * config['num_hidden_layers'] * config['num_key_value_heads'] * config['head_dim'] * 2:,} bytes in bf16 |

## Training
- Device: {log['device']} (torch {log['torch']}); {log['train_seconds']:.0f} s of training, evaluations included
  (stopped by: {log['stopped_by']}).
- {log['steps']:,} steps of {a['batch_size']} x {log['context']} tokens = {log['steps'] * log['tokens_per_step'] / 1e6:.1f}M tokens,
  {log['epochs']:.1f} epochs of the train split. The weights kept are those with the lowest held-out loss:
  step {log['best_step']:,} (epoch {log['best_epochs']:.1f}).
- AdamW (betas 0.9/0.95, weight decay {a['weight_decay']} on matrices), peak LR {a['lr']:g}, {a['warmup_steps']} warm-up
  steps then cosine to {a['min_lr_ratio']:g}x {schedule}, grad clip {a['grad_clip']},
  residual dropout {a['dropout']}, bf16 autocast, seed {a['seed']}.
- Command: `{log['command']}` (after `python -m labkit.train --tokenizer`); the log is `training_log.json`.
"""
    if sweep:
        card += f"""- Chosen from a sweep of {len(sweep['runs'])} runs that shared the GPU at the same time (so each
  run's speed, and its seconds above, depended on the others), by fp32 perplexity on all held-out
  tokens. The held-out chapters therefore served for model selection as well as for the figures below.

{sweep_table(sweep['runs'], sweep['chosen'])}"""
    if "first_round" in sweep:
        first = sweep["first_round"]
        card += f"""
  Before it, {first['note']}:

{sweep_table(first['runs'], None)}"""
    card += f"""
Training curve of the shipped run (held-out loss with bf16 autocast; nats/token):

| step | epoch | seconds | train loss | held-out loss |
| --- | --- | --- | --- | --- |
{curve_rows}

## Held-out perplexity
| what | perplexity |
| --- | --- |
| this model, first {r['tokens_scored']:,} held-out tokens, fp32, CPU (measured when this card was written) | **{r['perplexity']:.3f}** |
| same tokens, fp32, on the training GPU | {gpu['subset']['perplexity']:.3f} |
| all {gpu['all']['tokens_scored']:,} held-out tokens, fp32, on the training GPU (`--max-tokens 0` on a CPU: ~30 s) | {gpu['all']['perplexity']:.3f} |
| unigram baseline (train-split token frequencies, add-one), first {r['tokens_scored']:,} tokens | {unigram:.1f} |

Reproduce the bold figure (about {r['seconds']:.0f} s on {r['threads']} CPU threads):

    python -m labkit.evaluate --model data/model --max-tokens {CARD_MAX_TOKENS}

It should print {r['perplexity']:.3f}; expect agreement to within 0.1% (fp32 sums differ a little
across CPUs and thread counts). Windows: non-overlapping {config['max_position_embeddings']}-token windows of the
tokenised held-out stream, every token after the first scored (see `labkit/evaluate.py`).

## Greedy samples
Greedy decoding (`labkit.generate.generate`, {sample_tokens} new tokens, fp32 CPU). The first prompt
opens *Pride and Prejudice* (train split); the others are not in the corpus. Greedy decoding of a model
this small falls into loops.
"""
    for prompt, text in samples:  # each sample as a block quote, the prompt in bold
        card += "\n" + "\n".join("> " + line if line else ">" for line in f"**{prompt}**{text}".split("\n")) + "\n"
    (model_dir / "README.md").write_text(card)
    return card


def usage_error(parser: argparse.ArgumentParser, error: Exception) -> None:
    """A user's bad value as argparse reports a bad flag: one line on stderr, exit status 2, no traceback."""
    parser.error(" ".join(str(error).split()))


def load_or_usage_error(parser: argparse.ArgumentParser, model: pathlib.Path, device: str):
    """A CLI's --model and --device, loaded, or a usage error naming what is wrong with them."""
    from labkit.checkpoint import check_device

    try:
        check_device(device)
    except ValueError as e:
        usage_error(parser, f"--device: {e}")
    if not model.exists():
        usage_error(parser, f"--model {model}: no such directory or file (a model directory, or a .gguf file)")
    try:
        return load_for_evaluation(model, device)
    except (ValueError, FileNotFoundError) as e:
        usage_error(parser, f"--model {model}: {e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Held-out perplexity of a model directory or .gguf file (fp32).")
    parser.add_argument("--model", type=pathlib.Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--max-tokens", type=int, default=CARD_MAX_TOKENS,
                        help=f"score the first N held-out tokens (default {CARD_MAX_TOKENS}; 0 = all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write-card", action="store_true", help="write MODEL/README.md (the model card)")
    args = parser.parse_args(argv)
    if args.max_tokens < 0:
        usage_error(parser, f"--max-tokens must be >= 0 (0 scores every held-out token), got {args.max_tokens}")
    if args.write_card:
        print(write_card(args.model))
        return
    loaded = load_or_usage_error(parser, args.model, args.device)
    r = evaluate(args.model, args.max_tokens or None, args.device, loaded)
    print(f"held-out perplexity {r['perplexity']:.3f} (loss {r['loss']:.4f} nats) over {r['tokens_scored']:,} "
          f"of {r['heldout_tokens']:,} held-out tokens, fp32 on {r['device']}, {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
