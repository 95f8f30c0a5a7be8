"""Users against the engine on a virtual clock, and what each of them experiences (notebook 03).

The HTTP load generator for a real server is :mod:`labkit.loadtest`; this module replays users through the
engine itself, on its virtual clock, so the schedule does not depend on how busy this machine is.


    open loop    every request arrives at its trace time (``labkit.traces``: Poisson arrivals)
    closed loop  ``users=N``: N users each send a request, wait for the whole answer, then send the next
                 one at once (how "concurrent users" is usually meant in load tests)

    result = serve(engine, requests, users=8)
    result.summary()    throughput while all N users are in the system; TTFT, TPOT, latency p50 / p99
    result.slots        (steps, batch slots): which request held which slot at every step

The three servers of notebook 03 are restricted configurations of the one engine (:func:`server_config`):
one request at a time, static batching and continuous batching, all with a contiguous KV reservation.

Timing live on a CPU. The engine's clock is virtual: it advances by each step's measured time, so the
schedule does not depend on how long this machine spends between steps. :class:`ThreadTimeRunner` times a
step by the CPU time of the thread that runs it, not by the wall clock: on a shared machine the wall
clock also counts the time the operating system gave the core to someone else. With torch on one thread
(``torch.set_num_threads(1)``) that thread does all of the model's work. What load still changes (caches,
clock speed) shows as spread between repeats, which :func:`sweep_users` reports.
"""
from __future__ import annotations

import dataclasses
import heapq
import time

import numpy as np

from labkit.engine import EngineConfig, LLMEngine, Sequence, SimulatedRunner
from labkit.engine.model_runner import ModelRunner

SERVERS = ("one-at-a-time", "static", "continuous")


def server_config(server: str, **overrides) -> EngineConfig:
    """The engine as one of notebook 03's servers: "one-at-a-time" (one batch slot), "static" (a batch forms
    only in an empty engine and runs until its last request ends: HF ``generate`` on a padded batch) or
    "continuous" (Orca: admit and retire every step). All reserve prompt + max_tokens contiguously, so
    nothing is ever preempted. ``overrides`` are EngineConfig fields (pool size, batch slots, ...)."""
    if server not in SERVERS:
        raise ValueError(f"server must be one of {SERVERS}, got {server!r}")
    if server == "static":
        return EngineConfig.preset("hf_static", **overrides)
    if server == "one-at-a-time":
        return EngineConfig.preset("orca", **{**overrides, "batching": "one-at-a-time"})
    return EngineConfig.preset("orca", **overrides)


class ThreadTimeRunner(ModelRunner):
    """A :class:`~labkit.engine.model_runner.ModelRunner` whose step time is this thread's CPU time (see the
    module docstring): what the step cost, not how long the machine was busy with others meanwhile."""

    def execute(self, out):
        start = time.thread_time()
        tokens = super().execute(out)
        self.last_step_seconds = time.thread_time() - start
        return tokens


def live_engine(model, server: str, max_num_seqs: int, max_model_len: int, block_size: int = 16,
                clock: str = "thread") -> LLMEngine:
    """One of the three servers running ``model`` on this machine, its pool big enough for every slot's
    longest request. ``clock="thread"``: steps timed by thread CPU time (:class:`ThreadTimeRunner`);
    ``"wall"``: by the wall clock, as the plain ModelRunner does."""
    if clock not in ("thread", "wall"):
        raise ValueError(f"clock must be 'thread' or 'wall', got {clock!r}")
    per_seq = -(-max_model_len // block_size)
    cfg = server_config(server, num_blocks=max_num_seqs * per_seq, block_size=block_size,
                        max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                        max_num_batched_tokens=max(2048, max_num_seqs * max_model_len))
    runner = (ThreadTimeRunner if clock == "thread" else ModelRunner)(model, cfg, max_model_len)
    return LLMEngine(model, cfg, runner=runner, eos_token_ids=())


def simulated_engine(server: str, cost, model_config, max_num_seqs: int = 256, kv_tokens: int = 2**19,
                     block_size: int = 16) -> LLMEngine:
    """One of the three servers on the recorded GPU cost model (no model runs; ``SimulatedRunner``), with
    ``kv_tokens`` token slots of KV memory."""
    cfg = server_config(server, num_blocks=kv_tokens // block_size, block_size=block_size, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max(8192, model_config.max_position_embeddings))
    return LLMEngine(config=cfg, runner=SimulatedRunner(cost, model_config.vocab_size), model_config=model_config,
                     eos_token_ids=())


@dataclasses.dataclass
class LoadTestResult:
    sequences: list[Sequence]  # in the order the requests were given
    users: int | None  # closed loop: how many concurrent users
    step_end_s: np.ndarray  # the engine's clock after each step
    step_batch_sizes: np.ndarray  # sequences computed in each step
    slots: np.ndarray  # (steps, max_num_seqs): request id in that slot, -1 free, -2 held by a finished request

    def throughput_window(self) -> tuple[float, float]:
        """(start, end) of the window throughput is measured over. Open loop: first arrival to last
        token. Closed loop: time 0 to the moment the last request was sent; until then every user has
        a request in the system, so it is the throughput at that many concurrent users (the drain at
        the end, with fewer users left, is not counted)."""
        start = min(s.arrival_s for s in self.sequences)
        end = max(s.token_times[-1] for s in self.sequences)
        if self.users is not None:
            last_sent = max(s.arrival_s for s in self.sequences)
            end = last_sent if last_sent > start else end
        return start, end

    def summary(self) -> dict:
        """Throughput (output tokens/s over :meth:`throughput_window`) and latency over all requests
        (seconds; TTFT, TPOT and latency as :class:`labkit.engine.Sequence` defines them)."""
        seqs = self.sequences
        ttft = np.array([s.ttft for s in seqs])
        tpot = np.array([s.tpot for s in seqs if len(s.token_times) > 1] or [0.0])
        lat = np.array([s.latency for s in seqs])
        start, end = self.throughput_window()
        in_window = sum(start <= t <= end for s in seqs for t in s.token_times)
        return {
            "requests": len(seqs), "output_tokens": sum(s.num_output_tokens for s in seqs),
            "steps": len(self.step_end_s), "mean_batch": float(self.step_batch_sizes.mean()),
            "throughput_tok_s": in_window / (end - start) if end > start else float("nan"),
            "ttft_mean_s": float(ttft.mean()), "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)),
            "tpot_mean_s": float(tpot.mean()), "tpot_p50_s": float(np.percentile(tpot, 50)),
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
        }


class _SlotWatcher:
    """Engine observer: gives each request in the batch the lowest free slot row, step by step."""

    def __init__(self, num_slots: int):
        self.free = list(range(num_slots))
        self.row: dict = {}
        self.rows: list[list[int]] = []
        self.num_slots = num_slots

    def __call__(self, engine, out) -> None:
        sched = engine.scheduler
        running = [s.seq_id for s in sched.running]
        held = [s.seq_id for s in sched.batch_done]  # static batching: finished, slot kept until the batch ends
        here = set(running) | set(held)
        for sid in [s for s in self.row if s not in here]:
            heapq.heappush(self.free, self.row.pop(sid))
        line = [-1] * self.num_slots
        for sid in running + held:
            if sid not in self.row:
                self.row[sid] = heapq.heappop(self.free)
            line[self.row[sid]] = sid if sid in running else -2
        self.rows.append(line)


def _check_requests(engine: LLMEngine, requests) -> None:
    """Refuse a bad request before anything runs: a scratch engine of the same configuration (no model, a
    runner that is never called) takes every request through ``add_request``'s checks."""
    scratch = LLMEngine(config=engine.config, runner=object(), model_config=engine.model_config,
                        eos_token_ids=engine.eos_token_ids)
    for i, r in enumerate(requests):
        try:
            scratch.add_request(list(r.prompt_token_ids), r.params)
        except ValueError as e:
            raise ValueError(f"request {i} of {len(requests)} cannot be served, nothing was run: {e}") from None


def serve(engine: LLMEngine, requests, users: int | None = None, max_steps: int = 1_000_000) -> LoadTestResult:
    """Serve ``requests`` (``labkit.traces.TraceRequest``, or anything with ``prompt_token_ids``, ``params``,
    ``arrival_s``) to completion. Open loop (``users=None``): request i arrives at its ``arrival_s``.
    Closed loop (``users=N``): the first N arrive at time 0 and each finished request sends the next one at
    that moment. Every request is checked (as ``engine.add_request`` checks it) before anything runs."""
    if users is not None and (isinstance(users, bool) or not isinstance(users, int) or users < 1):
        raise ValueError(f"users must be an integer >= 1 or None, got {users!r}")
    if engine.history or engine.requests:
        raise ValueError("serve needs a fresh engine (this one has already served requests)")
    requests = list(requests)
    _check_requests(engine, requests)
    watcher = _SlotWatcher(engine.config.max_num_seqs)
    engine.observers.append(watcher)
    seqs: list[Sequence] = []

    def send(r, at):
        seqs.append(engine.add_request(list(r.prompt_token_ids), r.params, arrival_s=at))

    if users is None:
        for r in requests:
            send(r, r.arrival_s)
        queue = []
    else:
        for r in requests[:users]:
            send(r, 0.0)
        queue = requests[users:]
    ends, batch = [], []
    try:
        while engine.has_unfinished():
            if len(ends) >= max_steps:
                raise RuntimeError(f"not finished after {max_steps} steps")
            before = len(engine.history)
            served = engine.step()
            if len(engine.history) == before:
                continue  # nothing to do until the next arrival
            ends.append(engine.now)
            batch.append(engine.history[-1].num_seqs)
            for seq in served:
                if seq.is_finished and queue:  # closed loop: this user sends its next request now
                    send(queue.pop(0), engine.now)
    finally:
        engine.observers.remove(watcher)
    return LoadTestResult(seqs, users, np.asarray(ends), np.asarray(batch), np.asarray(watcher.rows))


def sweep_users(make_engine, requests, servers=SERVERS, users=(1, 2, 4, 8), requests_per_user: int = 2,
                min_requests: int = 1, repeats: int = 1) -> list[dict]:
    """Closed-loop serving for each server and number of concurrent users, ``repeats`` times each on a fresh
    engine (``make_engine(server)``), the first ``max(requests_per_user * users, min_requests)`` of
    ``requests``. The repeats are the outer loop, so a machine that slows down or speeds up meanwhile affects
    every setting alike. One row per (server, users): the median of every summary number, and for throughput
    also ``throughput_lo`` / ``throughput_hi`` (the smallest and largest of the repeats) and every repeat's value."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    settings = [(server, n) for server in servers for n in users]
    runs: dict = {key: [] for key in settings}
    for _ in range(repeats):
        for server, n in settings:
            chosen = list(requests)[:max(requests_per_user * n, min_requests)]
            runs[(server, n)].append(serve(make_engine(server), chosen, users=n).summary())
    rows = []
    for (server, n), done in runs.items():
        row = {"server": server, "users": n, "repeats": repeats}
        for key in done[0]:
            row[key] = float(np.median([r[key] for r in done]))
        tput = [r["throughput_tok_s"] for r in done]
        row.update(throughput_lo=min(tput), throughput_hi=max(tput), throughput_runs=tput)
        rows.append(row)
    return rows


# ---- notebook 03's live CPU load test (and its recorded reference, python -m labkit.bench batching_cpu) ----
CPU_USERS = (1, 2, 4, 8)
CPU_MAX_NUM_SEQS, CPU_MAX_MODEL_LEN = 8, 128


def cpu_requests(vocab_size: int, users=CPU_USERS):
    """Two requests per user with the ``alpaca`` preset's lengths divided by 4 (at most 60 new tokens), so
    the whole test runs in seconds on a CPU; every user count serves a prefix of the same list."""
    from labkit.traces import make_trace, requests_from_trace

    trace = make_trace("alpaca", num_requests=2 * max(users), rate=float("inf"), seed=0, max_len=512)
    return requests_from_trace(trace, vocab_size, seed=0, scale=0.25, max_new_tokens=60)


def cpu_sweep(model, repeats: int = 3, clock: str = "thread", users=CPU_USERS, servers=SERVERS) -> list[dict]:
    """The live load test of notebook 03 on ``model``: every server at every user count, ``repeats`` times."""
    reqs = cpu_requests(model.config.vocab_size, users)
    return sweep_users(lambda server: live_engine(model, server, CPU_MAX_NUM_SEQS, CPU_MAX_MODEL_LEN, clock=clock),
                       reqs, servers=servers, users=users, requests_per_user=2, repeats=repeats)


def noise_at_one_user(rows: list[dict]) -> float:
    """With one user every server runs the very same schedule (one request at a time), so any difference
    between their throughputs there is measurement noise: (largest - smallest) / smallest of the medians."""
    one = [r["throughput_tok_s"] for r in rows if r["users"] == 1]
    if len(one) < 2:
        raise ValueError("noise_at_one_user needs rows of at least two servers at users=1")
    return max(one) / min(one) - 1
