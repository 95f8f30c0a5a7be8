"""Step time without a KV cache against context length, on the CPU: the recorded reference of notebook 01.

Runs ``labkit.step_latency.measure`` (one thread, round-robin repeats, medians and spread) on the shipped model
over held-out text, and records the machine and its load average next to it, so a reader can tell a quiet
recording from a busy one. Run on an otherwise idle machine:

    python -m labkit.bench step_latency                      # data/bench/step_latency.json, ~1 min
    python -m labkit.bench step_latency --repeats 3 --lengths 16,64 --out /tmp/x.json   # a quick check
"""
from __future__ import annotations

import os

import torch

from labkit.bench import record


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lengths", default=None, help="comma-separated context lengths (default 16..496 by 32)")




def run(args) -> dict:
    from labkit.evaluate import encode_split
    from labkit.checkpoint import load_default_model
    from labkit.step_latency import DEFAULT_LENGTHS, measure

    model, tokenizer = load_default_model()  # on the CPU: the notebook's live run is on the CPU too
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else list(DEFAULT_LENGTHS)
    tokens = encode_split(tokenizer)[: max(lengths)]
    load_before = os.getloadavg()[0]
    curve = measure(model, tokens, lengths, repeats=args.repeats, num_threads=args.threads)
    return {"cpu": record.cpu_name(), "cpu_count": os.cpu_count(), "loadavg_1min_before": load_before,
            "loadavg_1min": os.getloadavg()[0], "torch_threads": args.threads, **curve.to_dict()}
