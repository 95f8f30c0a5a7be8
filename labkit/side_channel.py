"""A timing side channel in a shared prefix cache, and the per-tenant salt that closes it.

A prefix cache shared by every tenant answers faster when a prompt's start is already cached. An
attacker who can guess a candidate prefix (say a system prompt followed by a secret) sends it and
times the first token: fast means *somebody* sent that prefix recently. Wu et al. report ROC AUC 0.99
for 8-token prefixes against real serving systems (arXiv 2411.18191); vLLM's fix is a per-request
``cache_salt`` (vLLM PR #39082; CVE-2025-46570 covers vLLM's prefix-cache timing leak).

The experiment (``run_attack``), one trial at a time, on a fresh cache::

    victim  : [ system prompt | secret (whole blocks) | question ]       cached after it runs
    attacker: [ system prompt | candidate           | 1 token  ]       TTFT measured
    label   : candidate == secret ?                 (half the trials)

The attacker first learns a threshold from its *own* requests (where it knows what is cached), then
guesses "cached" when a probe's TTFT is below it. Reported: accuracy and ROC AUC over the trials.

Clocks (say which one produced a figure):
    clock="simulated"  TTFT = PrefillCostModel(uncached tokens) + Gaussian noise, with the cost model
                       and the noise calibrated on real CPU forwards of the model (``calibrate``)
    clock="cpu"        real wall-clock prefill time of the model through the Engine of labkit.preemption
                       with prefix caching, on this machine's CPU (small scale: slow and noisy)

``python -m labkit.side_channel`` prints both accuracies (shared cache, per-tenant salt).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from labkit.prefix_cache import PrefillCostModel, PrefixCachingBlockManager, one_thread

__all__ = ["roc_auc", "roc_curve", "calibrate", "run_attack", "load_model_for_timing", "main"]


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
    """The shipped model (data/model/), whose prefills are timed to calibrate the cost model.
    Returns (model, description)."""
    from labkit.model import load_default_model

    model, _ = load_default_model()
    return model.eval(), "the shipped model (data/model)"


def calibrate(model, lengths=(8, 24, 48, 96), repeats: int = 5) -> tuple[PrefillCostModel, float]:
    """Time real prefills of ``model`` on this CPU: (fitted PrefillCostModel, noise std in seconds).

    The noise is the spread of repeated timings around their median, pooled over lengths."""
    times, spread = [], []
    with torch.no_grad(), one_thread():
        for n in lengths:
            ids = torch.randint(0, model.config.vocab_size, (1, n))
            model(ids)  # warm-up
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                model(ids)
                ts.append(time.perf_counter() - t0)
            times.append(float(np.median(ts)))
            spread.extend(np.asarray(ts) - np.median(ts))
    cost = PrefillCostModel.fit(lengths, times)
    noise = float(1.4826 * np.median(np.abs(spread)))  # robust std (MAD): one slow outlier does not set it
    return cost, noise


def _trial_prompts(rng, vocab, block_size, system_blocks, secret_blocks):
    system = rng.integers(0, vocab, system_blocks * block_size).tolist()
    secret = rng.integers(0, vocab, secret_blocks * block_size).tolist()
    other = rng.integers(0, vocab, secret_blocks * block_size).tolist()
    question = rng.integers(0, vocab, block_size // 2 + 1).tolist()
    return system, secret, other, question


def _probe_cached_tokens(victim_ids, probe_ids, victim_salt, probe_salt, block_size) -> int:
    """Simulated server: a fresh cache, the victim's request, then the probe; the probe's cached tokens."""
    bm = PrefixCachingBlockManager(num_blocks=4 * (len(victim_ids) + len(probe_ids)) // block_size + 8,
                                   block_size=block_size)
    bm.allocate("victim", len(victim_ids), token_ids=victim_ids, cache_salt=victim_salt)
    bm.free("victim")
    bm.allocate("probe", len(probe_ids), token_ids=probe_ids, cache_salt=probe_salt)
    return bm.num_cached_tokens("probe")


def _cpu_ttft(model, victim_ids, probe_ids, victim_salt, probe_salt, block_size) -> float:
    """Real server on this CPU: run the victim's request, then time the probe's prefill (its TTFT)."""
    from labkit.preemption import Engine, Request

    num_blocks = 2 * (len(victim_ids) + len(probe_ids)) // block_size + 8
    engine = Engine(model, num_blocks=num_blocks, block_size=block_size, prefix_caching=True)
    engine.run([Request(0, victim_ids, 1, cache_salt=victim_salt)])
    engine.add(Request(1, probe_ids, 1, cache_salt=probe_salt))
    with one_thread():
        t0 = time.perf_counter()
        engine.step()  # admit + prefill + first token
        return time.perf_counter() - t0


def run_attack(num_trials: int = 400, salted: bool = False, clock: str = "simulated",
               cost: PrefillCostModel | None = None, noise_s: float = 0.0, model=None,
               block_size: int = 16, system_blocks: int = 2, secret_blocks: int = 1,
               vocab_size: int = 4096, num_calibration: int | None = None, seed: int = 0) -> dict:
    """Run the attack; see the module docstring. Returns accuracy, ROC AUC, scores and labels.

    salted: every tenant's chain starts from its own salt (victim "victim", attacker "attacker").
    clock: "simulated" (needs ``cost`` and ``noise_s``) or "cpu" (needs ``model``).
    """
    if clock == "simulated" and cost is None:
        raise ValueError('clock="simulated" needs a PrefillCostModel (cost=...); get one from calibrate(model)')
    if clock == "cpu" and model is None:
        raise ValueError('clock="cpu" needs the model to time (model=...)')
    if clock not in ("simulated", "cpu"):
        raise ValueError(f'clock must be "simulated" or "cpu", got {clock!r}')
    rng = np.random.default_rng(seed)
    attacker_salt = "attacker" if salted else None
    victim_salt = "victim" if salted else None

    def ttft(victim_ids, probe_ids, v_salt) -> float:
        if clock == "cpu":
            return _cpu_ttft(model, victim_ids, probe_ids, v_salt, attacker_salt, block_size)
        cached = _probe_cached_tokens(victim_ids, probe_ids, v_salt, attacker_salt, block_size)
        return cost.ttft(len(probe_ids), cached) + rng.normal(0.0, noise_s)

    def trial(v_salt) -> tuple[float, bool]:
        system, secret, other, question = _trial_prompts(rng, vocab_size, block_size, system_blocks, secret_blocks)
        label = bool(rng.integers(2))
        candidate = secret if label else other
        probe = system + candidate + [int(rng.integers(vocab_size))]
        return -ttft(system + secret + question, probe, v_salt), label  # score: faster = more likely cached

    # The attacker learns its threshold on its own requests (it plays the victim, with its own salt) and
    # attacks another tenant. The two kinds of trial are interleaved, so a machine that slows down or
    # speeds up during the run (a shared CPU does) shifts both alike.
    num_calibration = num_trials // 2 if num_calibration is None else num_calibration
    calib, runs = [], []
    for i in range(num_trials):
        runs.append(trial(victim_salt))
        while len(calib) < num_calibration * (i + 1) // num_trials:
            calib.append(trial(attacker_salt))
    cs, cl = np.array([s for s, _ in calib]), np.array([lab for _, lab in calib])
    candidates = np.sort(cs)
    accs = [((cs >= t) == cl).mean() for t in candidates]
    threshold = float(candidates[int(np.argmax(accs))])
    scores, labels = np.array([s for s, _ in runs]), np.array([lab for _, lab in runs])
    return {"accuracy": float(((scores >= threshold) == labels).mean()), "auc": roc_auc(scores, labels),
            "threshold_s": -threshold, "scores": scores, "labels": labels, "salted": salted, "clock": clock}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m labkit.side_channel", description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=400, help="attack trials per setting (simulated clock)")
    p.add_argument("--cpu-trials", type=int, default=0,
                   help="also run the attack with real CPU timing, this many trials per setting (slow; try 60)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    model, what = load_model_for_timing()
    cost, noise = calibrate(model)
    print(f"calibrated on {what}, this CPU: TTFT = {cost.overhead_s * 1e3:.2f} ms + {cost.per_token_s * 1e6:.1f} us/token "
          f"+ {cost.per_token_pair_s * 1e9:.2f} ns/token-pair; noise std {noise * 1e3:.3f} ms")
    print("clock: simulated (calibrated cost model + Gaussian noise); secret = 1 block of 16 tokens after 2 system blocks")
    out = {}
    for salted in (False, True):
        r = run_attack(args.trials, salted=salted, cost=cost, noise_s=noise, seed=args.seed)
        name = "per-tenant salt" if salted else "shared cache    "
        print(f"  {name}: attack accuracy {r['accuracy']:.3f}, ROC AUC {r['auc']:.3f}  ({args.trials} trials)")
        out[("simulated", salted)] = r
    if args.cpu_trials:
        print("clock: real wall-clock prefill on this CPU")
        for salted in (False, True):
            r = run_attack(args.cpu_trials, salted=salted, clock="cpu", model=model, seed=args.seed)
            name = "per-tenant salt" if salted else "shared cache    "
            print(f"  {name}: attack accuracy {r['accuracy']:.3f}, ROC AUC {r['auc']:.3f}  ({args.cpu_trials} trials)")
            out[("cpu", salted)] = r
    return out


if __name__ == "__main__":
    main()
