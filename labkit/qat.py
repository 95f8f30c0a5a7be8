"""Quantisation-aware training (QAT) for ternary weights, with a straight-through estimator.

    python -m labkit.qat [--steps 1200] [--seed 0] [--device auto] [--out data/model_ternary]

(the defaults are the recipe of the shipped data/model_ternary/: about a minute on one GPU; qat.json
records the exact command and the runs it was chosen from)

Rounding a trained model's weights to -1/0/+1 afterwards ruins it (every weight moves by up to half
a scale step, all at once). QAT keeps a full-precision *latent* weight W and trains through the
rounding:

    forward:   y = x @ (scale * T(W))^T          T = clamp(round(W / scale), -1, 1), scale = mean|W|
    backward:  dL/dW := dL/d(scale * T(W))        straight-through: pretend rounding is the identity

so W drifts until its ternary image works. Starting from the shipped model, a few hundred steps
recover most of what post-hoc ternarisation lost. At the end the latent weights are ternarised
once more (the same function the forward used, so nothing changes) and packed into a
:class:`~labkit.ternary.TernaryLinear` model directory, with ``qat.json`` recording the held-out
perplexities (full precision, post-hoc ternary, QAT ternary), the loss curve and the command.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import labkit  # noqa: F401  (CPU/GPU mode first)
from labkit.checkpoint import DEFAULT_MODEL_DIR, load_pretrained
from labkit.evaluate import CARD_MAX_TOKENS, encode_split, mean_loss
from labkit.ternary import LINEAR_NAMES, fake_ternarise, save_ternary, ternarise_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "data" / "model_ternary"


class QATLinear(nn.Linear):
    """nn.Linear whose forward uses the ternarised weight; gradients reach the latent weight unchanged (STE)."""

    granularity = "tensor"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_ternarise(self.weight, self.granularity), self.bias)


def prepare_qat(model: nn.Module, granularity: str = "tensor") -> nn.Module:
    """Turn every decoder linear into a QATLinear sharing its weight (in place); returns the model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in LINEAR_NAMES and type(child) is nn.Linear:
                q = QATLinear(child.in_features, child.out_features, bias=child.bias is not None,
                              device="meta")
                q.weight, q.bias = child.weight, child.bias
                q.granularity = granularity
                setattr(module, name, q)
    return model


def finish_qat(model: nn.Module, granularity: str = "tensor") -> nn.Module:
    """QATLinear -> TernaryLinear: ternarise the latent weights once and pack them (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, QATLinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(module, name, plain)
    return ternarise_model(model, granularity)


def batches(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Endless random (x, y) windows of the training stream: x (B, T), y = x shifted by one."""
    while True:
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, T+1)
        chunk = ids[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_qat(model: nn.Module, train_ids: torch.Tensor, *, steps: int, batch_size: int, seq_len: int,
              lr: float, seed: int, dropout: float = 0.0, log_every: int = 10,
              autocast_dtype: torch.dtype | None = None) -> list[dict]:
    """Fine-tune ``model`` (already through :func:`prepare_qat`) in place; returns the loss log.

    ``dropout``: residual dropout as the shipped model was trained with (labkit.train), on only while training.
    """
    from labkit.train import add_residual_dropout

    device = next(model.parameters()).device
    hooks = add_residual_dropout(model, dropout)
    gen = torch.Generator().manual_seed(seed)
    # No weight decay: it would pull latent weights towards 0, i.e. towards the ternary code 0.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    log, start, running = [], time.perf_counter(), 0.0
    data = batches(train_ids, batch_size, seq_len, gen)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        x, y = next(data)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step == steps - 1:
            n = (step % log_every) + 1
            log.append({"step": step + 1, "loss": running / n, "seconds": time.perf_counter() - start})
            running = 0.0
    for h in hooks:
        h.remove()
    model.eval()
    return log


def heldout_perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    loss, _ = mean_loss(model, ids)
    return math.exp(loss)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="QAT of the shipped model to ternary weights (straight-through estimator).")
    parser.add_argument("--model", type=pathlib.Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", type=float, default=0.3, help="residual dropout while training (the shipped recipe's)")
    parser.add_argument("--granularity", choices=("tensor", "row"), default="tensor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    parser.add_argument("--eval-tokens", type=int, default=CARD_MAX_TOKENS,
                        help=f"held-out tokens scored for each perplexity (default {CARD_MAX_TOKENS}; 0 = all)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":  # perplexities in true fp32; training itself runs under bf16 autocast
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(args.seed)
    model, tokenizer = load_pretrained(args.model, dtype=torch.float32, device=device)
    held = encode_split(tokenizer, "heldout")
    held = held[:args.eval_tokens + 1] if args.eval_tokens else held
    train_ids = encode_split(tokenizer, "train")

    result = {"model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model),
              "granularity": args.granularity, "eval_tokens": len(held) - 1}
    result["perplexity_fp32"] = heldout_perplexity(model, held)

    # Post-hoc: ternarise the trained weights as they are.
    posthoc, _ = load_pretrained(args.model, dtype=torch.float32, device=device)
    ternarise_model(posthoc, args.granularity)
    result["perplexity_posthoc_ternary"] = heldout_perplexity(posthoc, held)
    del posthoc

    prepare_qat(model, args.granularity)
    start = time.perf_counter()
    log = train_qat(model, train_ids, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                    lr=args.lr, seed=args.seed, dropout=args.dropout,
                    autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    train_seconds = time.perf_counter() - start
    finish_qat(model, args.granularity)
    result["perplexity_qat_ternary"] = heldout_perplexity(model, held)
    result.update({
        "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr,
        "dropout": args.dropout,
        "seed": args.seed, "train_tokens_seen": args.steps * args.batch_size * args.seq_len,
        "train_seconds": train_seconds, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "command": "python -m labkit.qat " + " ".join(argv if argv is not None else sys.argv[1:]),
        "loss_log": log,
    })
    model.to("cpu")
    save_ternary(model, args.out, tokenizer_dir=args.model, metadata={"trained_by": "python -m labkit.qat"})
    (args.out / "qat.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"held-out perplexity over {result['eval_tokens']:,} tokens: fp32 {result['perplexity_fp32']:.2f}, "
          f"post-hoc ternary {result['perplexity_posthoc_ternary']:.2f}, "
          f"QAT ternary {result['perplexity_qat_ternary']:.2f} "
          f"({args.steps} steps, {train_seconds:.0f} s on {result['device']}); wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
