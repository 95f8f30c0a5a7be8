"""How the lab's default model (data/model/) was made: a byte-level BPE tokenizer and a small Llama
trained on Jane Austen's novels (the train split of :mod:`labkit.corpus`).

    python -m labkit.train --tokenizer                 # data/model/tokenizer.json (CPU, seconds)
    python -m labkit.train --device cuda --out DIR     # a model (defaults: the shipped recipe):
                                                       #   DIR/{config.json, model.safetensors,
                                                       #   tokenizer.json, training_log.json}
    python -m labkit.train --select-best RUN_DIR... --out data/model
                                                       # keep the sweep run with the best held-out
                                                       #   perplexity (the card lists the sweep)
    python -m labkit.evaluate --write-card             # data/model/README.md
    python -m labkit.train --num-local-experts 8 --out data/model_moe ...
                                                       # a Mixtral-style MoE (labkit.moe): 8 SwiGLU experts
                                                       #   a layer, top-2, plus Switch's load-balancing loss

The shipped model is one of four such runs that shared an H200 at once (about 2.5 minutes in all);
on a CPU the same run would take many hours, and ``--minutes 0.2`` only checks that it runs.

Training, in one loop:

    random 512-token windows of the train stream -> bf16 autocast forward -> cross-entropy
    -> AdamW (weight decay on matrices only) -> LR: linear warm-up, then cosine to 10%
    every --eval-every steps: held-out loss; keep a copy of the weights with the best one

The corpus is about a million tokens, so a GPU sees it dozens of times in a few minutes and the
model starts to memorise it: residual dropout (--dropout) slows that, and the checkpoint kept is
the one with the lowest held-out loss, not the last. The LR schedule spans --steps steps (or, with
--steps 0, runs on the clock: progress = elapsed / --minutes; the log records the steps taken).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import platform
import sys
import time

import torch
import torch.nn.functional as F

from labkit.checkpoint import DEFAULT_MODEL_DIR, Tokenizer, save_pretrained
from labkit.config import LlamaConfig
from labkit.corpus import DOC_SEPARATOR, load_text
from labkit.kv_cache import KVCache
from labkit.moe import active_parameters, load_balancing_loss

VOCAB_SIZE = 4096
# The shipped model's shape: small enough to run in a CPU notebook, with GQA (8 query heads share
# 4 KV heads) so the KV-cache notebooks have something to show.
DEFAULT_CONFIG = LlamaConfig(
    vocab_size=VOCAB_SIZE, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
    num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=512,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=0,
)


# --- tokenizer --------------------------------------------------------------------------------------
def train_tokenizer(text: str, vocab_size: int = VOCAB_SIZE):
    """A GPT-2-style byte-level BPE (any UTF-8 text encodes; no unknown token) learnt from ``text``.
    ``DOC_SEPARATOR`` is the one special token, id 0, and doubles as end-of-text."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[DOC_SEPARATOR],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    paragraphs = (p for doc in text.split(DOC_SEPARATOR) for p in doc.split("\n\n"))
    tok.train_from_iterator(paragraphs, trainer)
    if tok.token_to_id(DOC_SEPARATOR) != 0:
        raise RuntimeError(f"{DOC_SEPARATOR} should be token 0, got {tok.token_to_id(DOC_SEPARATOR)}")
    return tok


# --- model ------------------------------------------------------------------------------------------
class CausalWindow(KVCache):
    """Training keeps no cache: each window attends causally to itself, through torch's fused SDPA
    (FlashAttention on a GPU) rather than the masked reference the serving code is checked against."""

    def attend(self, layer_idx, q, k, v, positions):
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # (B, Hq, T, D)
        v = v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def init_weights(model, std: float = 0.02) -> None:
    """GPT-2 init: N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2 * layers) so
    the residual stream's variance does not grow with depth."""
    residual_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            residual = name.endswith(("o_proj.weight", "down_proj.weight", "w2.weight"))  # w2: an expert's down
            torch.nn.init.normal_(p, 0.0, residual_std if residual else std)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)


def add_residual_dropout(model, p: float) -> list:
    """Dropout on the embedding and on each attention / MLP output before it joins the residual
    stream (GPT-2's placement). Done with forward hooks so labkit.model stays an inference model;
    hooks are not saved with the weights."""
    if p <= 0:
        return []
    drop = lambda module, args, out: F.dropout(out, p, module.training)  # noqa: E731
    modules = [model.model.embed_tokens] + [m for layer in model.model.layers for m in (
        layer.self_attn, layer.block_sparse_moe if layer.is_moe else layer.mlp)]
    return [m.register_forward_hook(drop) for m in modules]


# --- training ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainArgs:
    """Defaults are the shipped model's recipe (see data/model/README.md for the sweep behind them)."""
    device: str = "cpu"
    minutes: float = 3.0  # hard cap on training time; with --steps 0 also the LR schedule's length
    steps: int = 1000  # 0: run the cosine on the clock (progress = elapsed / --minutes)
    batch_size: int = 64  # windows of max_position_embeddings tokens
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.3
    grad_clip: float = 1.0
    eval_every: int = 25
    patience: int = 20  # evaluations without a new best held-out loss before stopping early
    seed: int = 0
    num_local_experts: int = 0  # > 0: a Mixtral-style MoE with this many experts a layer instead of the MLP
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 96  # one expert's SwiGLU width (the dense MLP's is 688)
    router_aux_loss_coef: float = 0.01  # Switch Transformer's load-balancing loss, times this


def lr_at(args: TrainArgs, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / args.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warm * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def train(args: TrainArgs, out: pathlib.Path, tokenizer_path: pathlib.Path) -> dict:
    from labkit.evaluate import mean_loss
    from labkit.model import LlamaForCausalLM

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    tokenizer = Tokenizer(tokenizer_path, eos_token_id=0)
    t0 = time.perf_counter()
    train_ids = torch.tensor(tokenizer.encode(load_text("train")), dtype=torch.long, device=device)
    held_ids = torch.tensor(tokenizer.encode(load_text("heldout")), dtype=torch.long)
    print(f"tokenised: train {len(train_ids):,} tokens, held-out {len(held_ids):,} ({time.perf_counter() - t0:.1f} s)",
          flush=True)

    config = dataclasses.replace(DEFAULT_CONFIG, vocab_size=tokenizer.vocab_size)
    if args.num_local_experts:
        config = dataclasses.replace(config, model_type="mixtral", num_local_experts=args.num_local_experts,
                                     num_experts_per_tok=args.num_experts_per_tok,
                                     intermediate_size=args.moe_intermediate_size)
    model = LlamaForCausalLM(config).to(device)
    init_weights(model)
    hooks = add_residual_dropout(model, args.dropout)
    router_logits = []  # MoE: each layer's router logits of this step, for the load-balancing loss
    hooks += [layer.block_sparse_moe.gate.register_forward_hook(lambda mod, a, out: router_logits.append(out))
              for layer in model.model.layers if layer.is_moe]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    amp = torch.bfloat16 if device.type == "cuda" else None  # CPU bf16 autocast is slower than fp32
    ctx = config.max_position_embeddings
    gen = torch.Generator(device=device).manual_seed(args.seed)
    offsets = torch.arange(ctx + 1, device=device)
    tokens_per_step = args.batch_size * ctx
    budget = args.minutes * 60

    def heldout_loss() -> float:
        model.eval()
        loss, _ = mean_loss(model, held_ids, ctx, batch_size=64, autocast_dtype=amp, cache_factory=CausalWindow)
        router_logits.clear()
        model.train()
        return loss

    curve, best, best_state, since_best, stopped_by = [], float("inf"), None, 0, "schedule"
    running = torch.zeros((), device=device)
    model.train()
    start = time.perf_counter()
    step = 0
    while True:
        elapsed = time.perf_counter() - start
        progress = step / args.steps if args.steps else elapsed / budget
        if args.steps and step >= args.steps:
            break
        if elapsed >= budget:
            stopped_by = "time budget" if not args.steps else "time cap (before --steps were done)"
            break
        lr = lr_at(args, step, progress)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train_ids) - ctx - 1, (args.batch_size,), device=device, generator=gen)
        batch = train_ids[starts[:, None] + offsets]  # (B, T + 1)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(batch[:, :-1], cache=CausalWindow())  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        objective = loss
        if router_logits:
            objective = loss + args.router_aux_loss_coef * load_balancing_loss(router_logits, config.num_experts_per_tok)
            router_logits.clear()
        opt.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        running += loss.detach()
        step += 1
        if step % args.eval_every == 0:
            val = heldout_loss()
            seconds = time.perf_counter() - start
            curve.append({"step": step, "seconds": round(seconds, 2),
                          "epochs": round(step * tokens_per_step / len(train_ids), 3), "lr": lr,
                          "train_loss": float(running) / args.eval_every, "heldout_loss": val})
            running.zero_()
            if val < best:
                best, since_best = val, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                since_best += 1
            print(f"step {step:5d}  {seconds:6.1f} s  epoch {curve[-1]['epochs']:6.2f}  lr {lr:.2e}  "
                  f"train {curve[-1]['train_loss']:.4f}  held-out {val:.4f}{'  *' if since_best == 0 else ''}",
                  flush=True)
            if since_best >= args.patience:
                stopped_by = f"early stop: no better held-out loss in {args.patience} evaluations"
                break
    train_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    if best_state is None:  # stopped before the first evaluation
        best_state, best = model.state_dict(), heldout_loss()
        curve.append({"step": step, "seconds": round(train_seconds, 2), "heldout_loss": best})
    model.load_state_dict(best_state)
    best_step = min(curve, key=lambda r: r["heldout_loss"])["step"]

    out.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, out, dtype=torch.bfloat16)
    (out / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
    log = {
        "command": "python -m labkit.train " + " ".join(sys.argv[1:]),
        "args": dataclasses.asdict(args),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()})"),
        "torch": torch.__version__,
        "parameters": model.num_parameters,
        "active_parameters": active_parameters(model),
        "train_tokens": len(train_ids), "heldout_tokens": len(held_ids),
        "tokens_per_step": tokens_per_step, "context": ctx,
        "steps": step, "epochs": step * tokens_per_step / len(train_ids), "train_seconds": train_seconds,
        "stopped_by": stopped_by,
        "best_step": best_step, "best_epochs": best_step * tokens_per_step / len(train_ids),
        "best_heldout_loss_bf16_autocast": best,
        "curve": curve,
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"saved {out}: best held-out loss {best:.4f} (ppl {math.exp(best):.2f}) at step {best_step} of {step}, "
          f"{train_seconds:.0f} s on {log['device']}; {stopped_by}", flush=True)
    return log


def final_eval(out: pathlib.Path, device: str) -> None:
    """fp32 perplexity of the saved (bf16-rounded) weights, on the card's subset and on all held-out
    tokens, added to the log: the numbers the card quotes and ``python -m labkit.evaluate`` reproduces."""
    from labkit.evaluate import CARD_MAX_TOKENS, evaluate

    log_path = out / "training_log.json"
    log = json.loads(log_path.read_text())
    log["eval_fp32"] = {"subset": evaluate(out, CARD_MAX_TOKENS, device), "all": evaluate(out, None, device)}
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    for name, r in log["eval_fp32"].items():
        print(f"fp32 held-out perplexity ({name}, {r['tokens_scored']:,} tokens, {device}): {r['perplexity']:.3f}")


def select_best(run_dirs: list[pathlib.Path], out: pathlib.Path) -> str:
    """Copy the run with the lowest fp32 held-out loss (all held-out tokens) to ``out``; its log gains a
    ``sweep`` entry summarising every run, so the card can say what the choice was made among."""
    logs = {d.name: json.loads((d / "training_log.json").read_text()) for d in run_dirs
            if (d / "training_log.json").exists()}
    if not logs:
        raise FileNotFoundError(f"no training_log.json in any of {[str(d) for d in run_dirs]}")
    best = min(logs, key=lambda name: logs[name]["eval_fp32"]["all"]["loss"])
    log = logs[best]
    log["sweep"] = {
        "chosen": best,
        "runs": {name: {"command": r["command"], "steps": r["steps"], "train_seconds": r["train_seconds"],
                        "best_step": r["best_step"], "best_epochs": r["best_epochs"], "stopped_by": r["stopped_by"],
                        "heldout_perplexity_fp32": r["eval_fp32"]["all"]["perplexity"]} for name, r in logs.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    src = next(d for d in run_dirs if d.name == best)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (out / name).write_bytes((src / name).read_bytes())
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    for name, r in log["sweep"]["runs"].items():
        print(f"{'*' if name == best else ' '} {name}: held-out ppl {r['heldout_perplexity_fp32']:.3f}, "
              f"best at epoch {r['best_epochs']:.1f} of {r['steps']} steps; {r['command']}")
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the lab's tokenizer or model (see the module docstring).")
    parser.add_argument("--tokenizer", action="store_true", help="train data/model/tokenizer.json and stop")
    parser.add_argument("--select-best", type=pathlib.Path, nargs="+", metavar="RUN_DIR",
                        help="copy the best of these finished runs to --out and stop")
    parser.add_argument("--out", type=pathlib.Path,
                        help="model directory to write (required; data/model is the shipped model)")
    parser.add_argument("--tokenizer-path", type=pathlib.Path, default=DEFAULT_MODEL_DIR / "tokenizer.json")
    for f in dataclasses.fields(TrainArgs):  # --device, --minutes, --steps, ... typed by the dataclass
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    ns = parser.parse_args(argv)
    if ns.tokenizer:
        tok = train_tokenizer(load_text("train"))
        ns.tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(ns.tokenizer_path))
        print(f"wrote {ns.tokenizer_path}: {tok.get_vocab_size()} tokens")
        return
    if ns.out is None:
        parser.error("--out DIR is required (to replace the shipped model, say --out data/model)")
    if ns.select_best:
        select_best(ns.select_best, ns.out)
        return
    args = TrainArgs(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainArgs)})
    train(args, ns.out, ns.tokenizer_path)
    final_eval(ns.out, args.device)


if __name__ == "__main__":
    main()
