"""Soak: 2,000 requests at 64 concurrent users against the shipped model on the CPU, one server process.

It must answer every request (0 server errors), give every KV block back (0 leaked blocks), and keep its
resident memory flat (growth < 5 % from the first quarter of the run to the last), which is what a
server that forgets finished requests and caps its step history does. ~2-3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import threading
import time

import pytest

import labkit  # noqa: F401
from labkit.loadtest import make_prompts, run_load
from labkit.server.dashboard import scrape
from labkit.server.process import ServerProcess

NUM_REQUESTS, USERS = 2000, 64


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_soak_2000_requests_at_64_users():
    psutil = pytest.importorskip("psutil")
    with ServerProcess("--max-num-seqs", str(USERS), "--num-blocks", "1024", "--max-waiting", "64") as server:
        proc = psutil.Process(server.proc.pid)
        samples, done = [], threading.Event()

        def watch():
            while not done.is_set():
                samples.append((time.perf_counter(), proc.memory_info().rss))
                time.sleep(0.25)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        prompts = make_prompts("austen", NUM_REQUESTS, input_len=12, output_len=6, seed=1)
        start = time.perf_counter()
        run = run_load(server.url, prompts, users=USERS, max_duration=330)
        end = time.perf_counter()
        done.set()
        watcher.join()
        time.sleep(0.5)
        m = scrape(server.url)
    s = run["summary"]
    print(f"soak: {s['completed']} ok in {s['wall_s']:.0f} s, {s['output_tok_s']:.0f} tok/s, errors {s['errors']}")
    assert s["completed"] == NUM_REQUESTS and s["server_errors"] == 0 and not s["errors"], s["errors"]
    assert m["kv_blocks_free"] == m["kv_blocks_total"] == 1024, "KV blocks leaked"
    assert m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0
    quarter = (end - start) / 4
    first = [r for t, r in samples if start <= t < start + quarter]
    last = [r for t, r in samples if t >= end - quarter]
    growth = max(last) / max(first) - 1
    print(f"soak: RSS {max(first) / 2**20:.0f} MiB in the first quarter, {max(last) / 2**20:.0f} MiB in the last "
          f"({growth:+.1%})")
    assert growth < 0.05, f"resident memory grew {growth:.1%} between the first and the last quarter"
