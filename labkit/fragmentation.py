"""How much of the KV pool holds real tokens: one trace, one pool, one number (and where the rest went).

    python -m labkit.fragmentation --cache contiguous --trace sharegpt
    python -m labkit.fragmentation --cache paged --trace sharegpt --block-size 16
    python -m labkit.fragmentation --cache contiguous --reserve oracle --max-len 4096

The vLLM paper (Kwon et al., SOSP 2023, arXiv 2309.06180) measured that in earlier serving systems only
20.4-38.2% of KV-cache memory held real token states, and that PagedAttention wastes under 4%. This
module serves a synthetic trace (labkit.traces) with the engine (labkit.engine: the contiguous
allocator, or the paged one with preemption by recompute) on the recorded GPU cost model, records the
pool at every step (labkit.pool_history) and prints the same kind of number, averaged over the steps at
which the pool was the bottleneck (a request was waiting), the loaded regime the paper measured.

The waste of one contiguous reservation has a closed form. A request with a prompt of P tokens,
O output tokens and a reservation of R slots stays O steps and fills P + k slots at its k-th step
(k = 0 .. O-1: the prompt's K/V, then one more per decode; its last token is returned, never stored),
so the slot-steps it reserves but leaves empty are::

    sum_{k=0}^{O-1} (R - P - k)  =  O * (R - P) - O * (O - 1) / 2

and the share of its reservation that holds tokens, over its life, is ``(P + (O - 1) / 2) / R``.
"""
from __future__ import annotations

import argparse
import sys

from labkit.engine import EngineConfig
from labkit.engine.config import RESERVE
from labkit.paged import blocks_needed
from labkit.pool_history import CATEGORIES, PoolHistory, replay
from labkit.traces import PRESETS, Trace, make_trace

RESERVE_POLICIES = RESERVE

PAPER_CONTIGUOUS_USEFUL = (0.204, 0.382)  # vLLM paper: share of KV memory holding token states, earlier systems
PAPER_PAGED_MAX_WASTE = 0.04  # vLLM paper: PagedAttention wastes under 4%

EXPLAIN = {
    "used": "holds a token's K/V",
    "reserved": "reserved for tokens not generated yet",
    "internal": "reserved but never used (internal fragmentation)",
    "external": "free, in gaps too small for the waiting request (external fragmentation)",
    "free": "free",
}

DEFAULTS = dict(num_requests=500, rate=20.0, seed=0, max_len=2048, pool_tokens=32768, max_num_seqs=256)


def reservation_waste(prompt_len: int, output_len: int, reserved: int) -> int:
    """Slot-steps a contiguous reservation of ``reserved`` slots holds but leaves empty over the
    request's life (see the module docstring)."""
    if prompt_len + output_len - 1 > reserved:
        raise ValueError(f"prompt {prompt_len} + output {output_len} does not fit a reservation of {reserved}")
    return output_len * (reserved - prompt_len) - output_len * (output_len - 1) // 2


def engine_config(cache: str, pool_tokens: int, reserve: str = "max_len", block_size: int = 16,
                  max_num_seqs: int = 256, watermark: float = 0.01) -> EngineConfig:
    """The pool ``run`` serves with. contiguous: reservations of consecutive token slots (block_size 1),
    placed first fit, continuous batching, nothing preempted (notebook 02); paged: ``block_size``-token
    blocks on demand, preemption by recompute, 1% watermark (notebook 04). No step token budget binds
    (``max_num_batched_tokens`` = the pool): memory alone limits the batch."""
    if cache == "contiguous":
        return EngineConfig.preset("orca", num_blocks=pool_tokens, block_size=1, reserve=reserve,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=pool_tokens)
    if cache == "paged":
        return EngineConfig.preset("paged", num_blocks=pool_tokens // block_size, block_size=block_size,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=pool_tokens,
                                   enable_chunked_prefill=False, watermark=watermark)
    raise ValueError(f"cache must be 'contiguous' or 'paged', got {cache!r}")


def paged_internal_waste(num_tokens: int, block_size: int) -> int:
    """Empty slots in the last block of a sequence of ``num_tokens`` tokens."""
    return blocks_needed(num_tokens, block_size) * block_size - num_tokens


def run(cache: str = "contiguous", trace: str | Trace = "sharegpt", reserve: str = "max_len", block_size: int = 16,
        max_new_tokens: int | None = None, **kw) -> tuple[Trace, PoolHistory]:
    """Make (or take) a trace, serve it with the engine's ``cache`` allocator, record the pool.
    ``kw`` overrides ``DEFAULTS``."""
    unknown = set(kw) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown arguments {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **kw}
    if isinstance(trace, str):
        trace = make_trace(trace, p["num_requests"], p["rate"], p["seed"], p["max_len"], max_new_tokens)
    config = engine_config(cache, p["pool_tokens"], reserve, block_size, p["max_num_seqs"])
    return trace, replay(trace, config)


def block_size_sweep(trace: Trace, block_sizes=(1, 4, 16, 64, 256), pool_tokens: int = 32768,
                     max_num_seqs: int = 256, done: dict[int, PoolHistory] | None = None) -> list[dict]:
    """Paged pool at each block size on the same trace: useful share and where the rest went. ``done``:
    runs of this trace and pool already made, by block size (not served again)."""
    rows = []
    for bs in block_sizes:
        sim = (done or {}).get(bs)
        if sim is None:
            sim = replay(trace, engine_config("paged", pool_tokens, block_size=bs, max_num_seqs=max_num_seqs))
        elif sim.capacity != pool_tokens // bs * bs or sim.block_size != bs:
            raise ValueError(f"the run given for block size {bs} is {sim.pool_name} with {sim.capacity} slots, "
                             f"not a paged pool of {pool_tokens} slots in blocks of {bs}")
        rows.append({"block_size": bs, **sim.shares(), "preemptions": sim.num_preemptions,
                     "duration_s": float(sim.step_end_s[-1])})
    return rows


def report(trace: Trace, sim: PoolHistory, window: str = "saturated") -> str:
    """The text the command prints."""
    s = trace.summary()
    shares = sim.shares(window)
    mask = sim.saturated if window == "saturated" else sim.running > 0
    what = {"saturated": "a request was waiting for memory", "busy": "any request was in the pool"}[window]
    if not mask.any():
        mask, what = sim.running > 0, "any request was in the pool; the pool never ran full"
    lines = [
        f"trace: {s['preset']}, {s['num_requests']} requests, Poisson {s['rate_per_s']:g}/s, seed {trace.seed}; "
        f"mean prompt {s['prompt_mean']:.0f}, output {s['output_mean']:.0f} tokens; max_len {s['max_len']}",
        f"pool:  {sim.capacity} token slots, {sim.pool_name}; {sim.num_steps} engine steps, "
        f"{sim.step_end_s[-1]:.1f} s of simulated GPU serving (Llama-3-8B step times, labkit.step_cost)",
        f"measured over the {int(mask.sum())} of {sim.num_steps} steps in which {what}",
        f"useful memory (slots holding a token): {100 * shares['used']:.1f}%",
    ]
    lines += [f"  {c:9s} {100 * shares[c]:5.1f}%  {EXPLAIN[c]}" for c in CATEGORIES]
    lines.append(f"preemptions (by recompute): {sim.num_preemptions}; refused requests: {len(sim.refused)}")
    lo, hi = PAPER_CONTIGUOUS_USEFUL
    lines.append(f"vLLM paper (Kwon et al. 2023): earlier systems {100 * lo:.1f}-{100 * hi:.1f}% useful; "
                 f"PagedAttention wastes under {100 * PAPER_PAGED_MAX_WASTE:.0f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m labkit.fragmentation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", choices=["contiguous", "paged"], default="contiguous")
    ap.add_argument("--trace", choices=sorted(PRESETS), default="sharegpt")
    ap.add_argument("--reserve", choices=RESERVE_POLICIES, default="max_len",
                    help="contiguous only: how much to reserve per request at admission")
    ap.add_argument("--block-size", type=int, default=16, help="paged only: token slots per block")
    ap.add_argument("--max-len", type=int, default=DEFAULTS["max_len"], help="the model's context length")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="the cap clients send (default: whatever the context leaves)")
    ap.add_argument("--num-requests", type=int, default=DEFAULTS["num_requests"])
    ap.add_argument("--rate", type=float, default=DEFAULTS["rate"], help="Poisson arrivals per second")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--pool-tokens", type=int, default=DEFAULTS["pool_tokens"], help="pool size in token slots")
    ap.add_argument("--max-num-seqs", type=int, default=DEFAULTS["max_num_seqs"], help="batch slots of the engine")
    ap.add_argument("--window", choices=["saturated", "busy"], default="saturated",
                    help="average over steps with a request waiting (default) or with any request running")
    a = ap.parse_args(argv)
    trace, sim = run(a.cache, a.trace, a.reserve, a.block_size, a.max_new_tokens, num_requests=a.num_requests,
                     rate=a.rate, seed=a.seed, max_len=a.max_len, pool_tokens=a.pool_tokens,
                     max_num_seqs=a.max_num_seqs)
    print(report(trace, sim, a.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
