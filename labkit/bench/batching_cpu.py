"""The CPU reference for notebook 03's live load test: the shipped model served by the three servers
(one at a time, static, continuous batching) to 1, 2, 4 and 8 concurrent users, each setting repeated.

    python -m labkit.bench batching_cpu [--repeats 7]

Runs on the CPU (no GPU needed), torch on one thread, each step timed by the thread's CPU time
(``labkit.user_sweep.ThreadTimeRunner``), so a busy machine disturbs it less than a wall clock would.
Rows are ``labkit.user_sweep.sweep_users`` rows: medians, and ``throughput_lo`` / ``throughput_hi`` /
``throughput_runs`` over the repeats. ``machine`` says which CPU, and how loaded it was before and after.
"""
from __future__ import annotations

import os

from labkit.bench import record


def add_arguments(parser) -> None:
    parser.add_argument("--repeats", type=int, default=7, help="runs of every (server, users) setting")




def run(args) -> dict:
    import torch

    from labkit.user_sweep import CPU_MAX_MODEL_LEN, CPU_MAX_NUM_SEQS, CPU_USERS, cpu_sweep
    from labkit.checkpoint import load_default_model

    torch.set_num_threads(1)
    load_before = os.getloadavg()
    model, _ = load_default_model()
    rows = cpu_sweep(model, repeats=args.repeats, clock="thread")
    return {
        "shapes": {"model": "data/model (the shipped model)", "users": list(CPU_USERS), "requests_per_user": 2,
                   "workload": "alpaca preset / 4, at most 60 new tokens, seed 0", "max_num_seqs": CPU_MAX_NUM_SEQS,
                   "max_model_len": CPU_MAX_MODEL_LEN, "repeats": args.repeats, "torch_threads": 1,
                   "clock": "thread CPU time per step (labkit.user_sweep.ThreadTimeRunner)"},
        "machine": {"cpu": record.cpu_name(), "logical_cores": os.cpu_count(),
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "rows": rows,
    }
