"""A timing side channel in a shared prefix cache, and the per-tenant salt that closes it, on the engine.

A prefix cache shared by every tenant answers faster when a prompt's start is already cached. An
attacker who can guess a candidate prefix (say a system prompt followed by a secret) sends it and
times the first token: fast means *somebody* sent that prefix recently. Wu et al. report ROC AUC 0.99
for 8-token prefixes against real serving systems (arXiv 2411.18191); vLLM's fix is a per-request
``cache_salt`` (vLLM PR #17045, documented in #39082; CVE-2025-46570).

The experiment (``run_attack``), one trial at a time, each on a fresh engine (``EngineConfig.preset("prefix")``)::

    victim  : [ system prompt | secret (whole blocks) | question ]       served first: its blocks stay cached
    attacker: [ system prompt | candidate           | 1 token  ]       TTFT read off the engine
    label   : candidate == secret ?                 (half the trials)

The attacker first learns a threshold from its *own* requests (where it knows what is cached), then
guesses "cached" when a probe's TTFT is below it. Reported: accuracy and ROC AUC over the trials.

Clocks (say which one produced a figure):
    clock="simulated"  the engine runs with :class:`PrefillClockRunner`: each step takes
                       ``PrefillCostModel`` seconds for the tokens it really computes, plus Gaussian noise;
                       cost and noise calibrated on real engine prefills on this CPU (``calibrate``)
    clock="cpu"        the engine runs the real model; TTFT is the wall-clock time of the probe's step,
                       on one CPU thread (small scale, and as noisy as this machine is)

``python -m labkit.side_channel`` prints both accuracies (shared cache, per-tenant salt).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from typing import Sequence

import numpy as np
import torch

from labkit.engine import EngineConfig, LLMEngine, SamplingParams

__all__ = ["PrefillCostModel", "PrefillClockRunner", "one_thread", "roc_auc", "roc_curve", "calibrate",
           "run_attack", "repeat_attack", "load_model_for_timing", "main"]

BLOCK_SIZE = 16


@dataclasses.dataclass(frozen=True)
class PrefillCostModel:
    """Time of a step that prefills one prompt, as a function of the tokens it really computes.

    ``seconds = overhead_s + per_token_s * computed + per_token_pair_s * computed * context``: the
    per-token term is the linear layers, the pair term is attention (each new token reads every
    earlier one, ``context`` = cached + computed). ``fit`` calibrates it on measured prefills.
    """

    overhead_s: float
    per_token_s: float
    per_token_pair_s: float = 0.0

    def ttft(self, num_tokens: int, num_cached_tokens: int = 0) -> float:
        computed = num_tokens - num_cached_tokens
        return self.overhead_s + self.per_token_s * computed + self.per_token_pair_s * computed * num_tokens

    @classmethod
    def fit(cls, lengths: Sequence[int], seconds: Sequence[float]) -> "PrefillCostModel":
        """Least-squares fit of overhead + per_token * n + pair * n^2 to measured full prefills."""
        n = np.asarray(lengths, dtype=float)
        A = np.stack([np.ones_like(n), n, n * n], axis=1)
        coef, *_ = np.linalg.lstsq(A, np.asarray(seconds, dtype=float), rcond=None)
        overhead, per_tok, pair = (max(float(c), 0.0) for c in coef)
        return cls(overhead, per_tok, pair)


class PrefillClockRunner:
    """A runner with no model (the engine's ``runner=``): a step takes the cost model's time for the tokens
    it computes (prefix-cache hits excluded, as the real runner skips them) plus Gaussian noise."""

    def __init__(self, cost: PrefillCostModel, noise_s: float, rng: np.random.Generator, vocab_size: int):
        self.cost, self.noise_s, self.rng, self.vocab_size = cost, noise_s, rng, vocab_size
        self.last_step_seconds = 0.0

    def execute(self, out) -> dict[int, int]:
        seconds = self.cost.overhead_s
        for s in out.scheduled:
            context = s.seq.num_computed_tokens + s.num_new_tokens
            seconds += self.cost.ttft(context, context - s.num_new_tokens) - self.cost.overhead_s
        self.last_step_seconds = max(seconds + self.rng.normal(0.0, self.noise_s), 0.0)
        return {s.seq.seq_id: 1 for s in out.scheduled if s.samples}


@contextlib.contextmanager
def one_thread():
    """Time on one CPU thread: on a shared machine several threads make the timings far noisier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties 1/2."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("roc_auc needs both positive and negative labels")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) as the threshold sweeps from high to low."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    thresholds = np.concatenate([[np.inf], np.sort(np.unique(s))[::-1]])
    tpr = np.array([(s[y] >= t).mean() for t in thresholds])
    fpr = np.array([(s[~y] >= t).mean() for t in thresholds])
    return fpr, tpr


def load_model_for_timing():
    """The shipped model (data/model/), whose prefills are timed. Returns (model, description)."""
    from labkit.checkpoint import load_default_model

    model, _ = load_default_model()
    return model.eval(), "the shipped model (data/model)"


def _engine(model, num_tokens: int, runner=None, model_config=None) -> LLMEngine:
    num_blocks = 2 * (num_tokens // BLOCK_SIZE + 2)
    cfg = EngineConfig.preset("prefix", num_blocks=num_blocks, block_size=BLOCK_SIZE, max_num_seqs=1,
                              watermark=0.0, enforce_eager=True)
    return LLMEngine(model, cfg, runner=runner, model_config=model_config, eos_token_ids=())


def _ttft(engine: LLMEngine, prompt, salt) -> float:
    """Serve ``prompt`` alone (one output token) and return its TTFT on the engine's clock."""
    seq = engine.add_request(list(prompt), SamplingParams(max_tokens=1), cache_salt=salt)
    engine.run(max_steps=10)
    return seq.ttft


def calibrate(model, lengths=(8, 24, 48, 96), repeats: int = 5) -> tuple[PrefillCostModel, float]:
    """Time real prefills of ``model`` through the engine on this CPU, one thread:
    (fitted PrefillCostModel, noise std in seconds). The noise is the spread of repeated timings around
    their median, pooled over lengths (a robust std, so one slow outlier does not set it)."""
    times, spread = [], []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), one_thread():
        for n in lengths:
            ts = []
            for r in range(repeats + 1):  # the first is a warm-up
                prompt = torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()
                t = _ttft(_engine(model, n), prompt, None)
                if r:
                    ts.append(t)
            times.append(float(np.median(ts)))
            spread.extend(np.asarray(ts) - np.median(ts))
    cost = PrefillCostModel.fit(lengths, times)
    noise = float(1.4826 * np.median(np.abs(spread)))
    return cost, noise


def _trial_prompts(rng, vocab, system_blocks, secret_blocks):
    system = rng.integers(0, vocab, system_blocks * BLOCK_SIZE).tolist()
    secret = rng.integers(0, vocab, secret_blocks * BLOCK_SIZE).tolist()
    other = rng.integers(0, vocab, secret_blocks * BLOCK_SIZE).tolist()
    question = rng.integers(0, vocab, BLOCK_SIZE // 2 + 1).tolist()
    return system, secret, other, question


def run_attack(num_trials: int = 400, salted: bool = False, clock: str = "simulated",
               cost: PrefillCostModel | None = None, noise_s: float = 0.0, model=None,
               system_blocks: int = 2, secret_blocks: int = 1, vocab_size: int = 4096,
               num_calibration: int | None = None, seed: int = 0) -> dict:
    """Run the attack; see the module docstring. Returns accuracy, ROC AUC, scores and labels.

    salted: every tenant's chain starts from its own salt (victim "victim", attacker "attacker").
    clock: "simulated" (needs ``cost`` and ``noise_s``) or "cpu" (needs ``model``).
    """
    if clock not in ("simulated", "cpu"):
        raise ValueError(f'clock must be "simulated" or "cpu", got {clock!r}')
    if clock == "simulated" and cost is None:
        raise ValueError('clock="simulated" needs a PrefillCostModel (cost=...); get one from calibrate(model)')
    if clock == "cpu" and model is None:
        raise ValueError('clock="cpu" needs the model to time (model=...)')
    if num_trials < 2:
        raise ValueError(f"num_trials must be >= 2 (both labels are needed for an AUC), got {num_trials}")
    rng = np.random.default_rng(seed)
    attacker_salt = "attacker" if salted else None
    victim_salt = "victim" if salted else None
    if clock == "cpu":
        vocab_size = model.config.vocab_size
    from labkit.config import LlamaConfig

    sim_config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096)

    def ttft(victim_ids, probe_ids, v_salt) -> float:
        n = len(victim_ids) + len(probe_ids)
        if clock == "cpu":
            engine = _engine(model, n)
        else:
            engine = _engine(None, n, runner=PrefillClockRunner(cost, noise_s, rng, vocab_size), model_config=sim_config)
        _ttft(engine, victim_ids, v_salt)  # the victim's request: its full blocks stay in the cache
        return _ttft(engine, probe_ids, attacker_salt)

    def trial(v_salt) -> tuple[float, bool]:
        system, secret, other, question = _trial_prompts(rng, vocab_size, system_blocks, secret_blocks)
        label = bool(rng.integers(2))
        candidate = secret if label else other
        probe = system + candidate + [int(rng.integers(vocab_size))]
        return -ttft(system + secret + question, probe, v_salt), label  # score: faster = more likely cached

    # The attacker learns its threshold on its own requests (it plays the victim, with its own salt) and
    # attacks another tenant. The two kinds of trial are interleaved, so a machine that slows down or
    # speeds up during the run (a shared CPU does) shifts both alike.
    num_calibration = num_trials // 2 if num_calibration is None else num_calibration
    calib, runs = [], []
    with torch.no_grad(), one_thread():
        for i in range(num_trials):
            runs.append(trial(victim_salt))
            while len(calib) < num_calibration * (i + 1) // num_trials:
                calib.append(trial(attacker_salt))
    cs, cl = np.array([s for s, _ in calib]), np.array([lab for _, lab in calib])
    candidates = np.sort(cs)
    accs = [((cs >= t) == cl).mean() for t in candidates]
    threshold = float(candidates[int(np.argmax(accs))])
    scores, labels = np.array([s for s, _ in runs]), np.array([lab for _, lab in runs])
    if labels.all() or not labels.any():
        raise ValueError(f"all {num_trials} trials drew one label; use more trials or another seed")
    return {"accuracy": float(((scores >= threshold) == labels).mean()), "auc": roc_auc(scores, labels),
            "threshold_s": -threshold, "scores": scores, "labels": labels, "salted": salted, "clock": clock}


def repeat_attack(repeats: int, num_trials: int, settings=(False, True), **kwargs) -> dict:
    """The attack ``repeats`` times (seeds 0, 1, ...) for each setting (salted False: shared cache, True:
    per-tenant salt): AUCs and accuracies per repeat, and their median / min / max, so a figure can show how
    much one run can be trusted."""
    out = {}
    for salted in settings:
        runs = [run_attack(num_trials, salted=salted, seed=s, **kwargs) for s in range(repeats)]
        aucs = np.array([r["auc"] for r in runs])
        out[salted] = {"auc": aucs, "accuracy": np.array([r["accuracy"] for r in runs]),
                       "median_auc": float(np.median(aucs)), "min_auc": float(aucs.min()),
                       "max_auc": float(aucs.max()), "runs": runs}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m labkit.side_channel", description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=400, help="attack trials per setting (simulated clock)")
    p.add_argument("--cpu-trials", type=int, default=0,
                   help="also run the attack with real CPU timing, this many trials per setting (slow; try 60)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model, what = load_model_for_timing()
    cost, noise = calibrate(model)
    print(f"calibrated on {what} through the engine, this CPU, one thread: TTFT = {cost.overhead_s * 1e3:.2f} ms "
          f"+ {cost.per_token_s * 1e6:.1f} us/token + {cost.per_token_pair_s * 1e9:.2f} ns/token-pair; "
          f"noise std {noise * 1e3:.3f} ms")
    print(f"clock: simulated (calibrated cost model + Gaussian noise); secret = 1 block of {BLOCK_SIZE} tokens "
          "after 2 system blocks")
    out = {}
    for salted in (False, True):
        r = run_attack(args.trials, salted=salted, cost=cost, noise_s=noise, seed=args.seed)
        name = "per-tenant salt" if salted else "shared cache    "
        print(f"  {name}: attack accuracy {r['accuracy']:.3f}, ROC AUC {r['auc']:.3f}  ({args.trials} trials)")
        out[("simulated", salted)] = r
    if args.cpu_trials:
        print("clock: real wall-clock prefill through the engine on this CPU, one thread")
        for salted in (False, True):
            r = run_attack(args.cpu_trials, salted=salted, clock="cpu", model=model, seed=args.seed)
            name = "per-tenant salt" if salted else "shared cache    "
            print(f"  {name}: attack accuracy {r['accuracy']:.3f}, ROC AUC {r['auc']:.3f}  ({args.cpu_trials} trials)")
            out[("cpu", salted)] = r
    return out


if __name__ == "__main__":
    main()
