"""The serving loop: requests arrive, the scheduler picks a step, a runner executes it, metrics come out.

    requests ──> Scheduler.schedule() ──> runner.run(step) ──> Scheduler.postprocess() ──> metrics
                 (labkit.scheduler)       ModelRunner: the real model on this machine, timed
                                          SimulatedRunner: no model; labkit.step_cost says how long
                                          the step takes on the recorded GPU

The server's clock is virtual: it advances by each step's time (measured, or predicted) and jumps
over idle gaps to the next arrival, so a trace of minutes replays in seconds and the schedule does
not depend on how busy this machine is between steps.

Two ways requests arrive:
    open loop    each request arrives at its trace time (``labkit.traces``: Poisson arrivals)
    closed loop  ``users=N``: N users each send a request, wait for the whole answer, then send the
                 next one at once (how "concurrent users" is usually meant in load tests)
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from labkit.kv_cache import ContiguousCache
from labkit.scheduler import ScheduledStep, Scheduler, Sequence
from labkit.step_cost import StepCostModel

SERVERS = ("one-at-a-time", "static", "continuous")


def make_scheduler(server: str, max_num_seqs: int, max_num_tokens: int, max_model_len: int) -> Scheduler:
    """'one-at-a-time' (a single slot), 'static' or 'continuous' batching with these limits."""
    if server not in SERVERS:
        raise ValueError(f"server must be one of {SERVERS}, got {server!r}")
    if server == "one-at-a-time":
        return Scheduler(1, max_num_tokens, max_model_len, policy="continuous")
    return Scheduler(max_num_seqs, max_num_tokens, max_model_len, policy=server)


class ModelRunner:
    """Runs a LlamaForCausalLM on this machine, greedy. Row ``seq.slot`` of one ContiguousCache holds
    each running sequence's K/V; every prompt is prefilled on its own, then all decodes go in one batch
    with per-row positions (ragged: each row is at its own position)."""

    def __init__(self, model, max_num_seqs: int, max_model_len: int):
        p = next(model.parameters())
        self.model = model
        self.cache = ContiguousCache(model.config, max_num_seqs, max_model_len, dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def run(self, step: ScheduledStep) -> tuple[list[int], float]:
        """The next token of every sequence in ``step.seqs`` order, and the wall time it took."""
        device = self.cache.k.device
        start = time.perf_counter()
        tokens = []
        for seq in step.prefill:
            self.cache.reset(seq.slot)
            logits = self.model(torch.tensor([seq.prompt_ids], device=device), cache=self.cache.view([seq.slot]))
            tokens.append(int(logits[0, -1].argmax()))
        if step.decode:
            ids = torch.tensor([[s.output_ids[-1]] for s in step.decode], device=device)  # (B, 1)
            pos = torch.tensor([[s.num_tokens - 1] for s in step.decode], device=device)  # (B, 1) ragged
            logits = self.model(ids, pos, cache=self.cache.view([s.slot for s in step.decode]))
            tokens += logits[:, -1].argmax(-1).tolist()
        return tokens, time.perf_counter() - start


class SimulatedRunner:
    """Runs no model: each step takes what the step-cost model predicts; the tokens are placeholders
    (a sequence stops after max_new_tokens, as a trace's requests do)."""

    def __init__(self, cost: StepCostModel):
        self.cost = cost

    def run(self, step: ScheduledStep) -> tuple[list[int], float]:
        seconds = self.cost.step_seconds([s.prompt_len for s in step.prefill], [s.num_tokens for s in step.decode])
        return [0] * len(step.seqs), seconds


@dataclasses.dataclass
class ServingResult:
    sequences: list[Sequence]
    step_batch_sizes: list[int]  # sequences run in each step
    step_seconds: list[float]
    step_end_s: list[float]  # the clock after each step (token times are these values)
    users: int | None = None  # closed loop: how many concurrent users

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

    def occupancy(self) -> np.ndarray:
        """(steps, slots) picture of the batch: seq_id running in that slot at that step, -1 for a free
        slot, -2 for a slot held by a request that has already finished (static batching's waste)."""
        ends = np.asarray(self.step_end_s)
        slots = 1 + max(s.slot for s in self.sequences)
        grid = np.full((len(ends), slots), -1, dtype=np.int64)
        step_of = lambda t: int(np.searchsorted(ends, t))  # noqa: E731  the step that ended at time t
        for s in self.sequences:
            first, last = step_of(s.token_times[0]), step_of(s.token_times[-1])
            grid[first:last + 1, s.slot] = s.seq_id
            grid[last + 1:step_of(s.retired_s) + 1, s.slot] = -2
        return grid

    def summary(self) -> dict:
        """Throughput (tokens/s over :meth:`throughput_window`) and latency over all requests (seconds)."""
        seqs = self.sequences
        ttft = np.array([s.ttft for s in seqs])
        tpot = np.array([s.tpot for s in seqs if len(s.token_times) > 1] or [0.0])
        lat = np.array([s.latency for s in seqs])
        start, end = self.throughput_window()
        in_window = sum(start <= t <= end for s in seqs for t in s.token_times)
        return {
            "requests": len(seqs), "output_tokens": sum(len(s.output_ids) for s in seqs),
            "steps": len(self.step_seconds),
            "mean_batch": float(np.mean(self.step_batch_sizes)) if self.step_batch_sizes else 0.0,
            "throughput_tok_s": in_window / (end - start) if end > start else float("nan"),
            "ttft_mean_s": float(ttft.mean()), "ttft_p50_s": float(np.percentile(ttft, 50)),
            "ttft_p99_s": float(np.percentile(ttft, 99)),
            "tpot_mean_s": float(tpot.mean()), "tpot_p50_s": float(np.percentile(tpot, 50)),
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
        }


def serve(requests: list[Sequence], scheduler: Scheduler, runner, users: int | None = None) -> ServingResult:
    """Serve ``requests`` to completion and return what happened to each.

    Open loop (``users=None``): request i arrives at ``requests[i].arrival_s``. Closed loop (``users=N``):
    the first N arrive at time 0, and each finished request releases the next one at that moment
    (its ``arrival_s`` is overwritten). Every request is checked by ``scheduler.add`` before anything
    runs, so a request that could never be served is refused up front.
    """
    if users is not None and users < 1:
        raise ValueError(f"users must be >= 1 or None, got {users}")
    if len({id(s) for s in requests}) != len(requests):
        raise ValueError("the same Sequence object appears twice in requests")
    for seq in requests:  # refuse bad requests before serving anything
        scheduler.check(seq)
    pending = sorted(requests, key=lambda s: s.arrival_s) if users is None else list(requests)
    if users is not None:
        for i, seq in enumerate(pending):
            seq.arrival_s = 0.0 if i < users else float("inf")  # inf: not sent yet
    released = len(pending) if users is None else min(users, len(pending))
    nxt, now = 0, 0.0  # pending[nxt] is the next request to arrive
    batch_sizes, step_seconds, step_end_s = [], [], []
    while nxt < len(pending) or scheduler.has_work():
        while nxt < len(pending) and pending[nxt].arrival_s <= now:
            scheduler.add(pending[nxt])
            nxt += 1
        if not scheduler.has_work():
            now = pending[nxt].arrival_s  # idle: jump to the next arrival
            continue
        step = scheduler.schedule(now)
        tokens, seconds = runner.run(step)
        now += seconds
        batch_sizes.append(len(step.seqs))
        step_seconds.append(seconds)
        step_end_s.append(now)
        completed = scheduler.postprocess(step, tokens, now)
        for _ in completed:  # closed loop: each finished user sends its next request now
            if released < len(pending):
                pending[released].arrival_s = now
                released += 1
    return ServingResult(list(requests), batch_sizes, step_seconds, step_end_s, users)


def requests_from_trace(trace, vocab_size: int, seed: int = 0, max_new_tokens: int | None = None,
                        scale: float = 1.0) -> list[Sequence]:
    """Sequences with the trace's arrival times, prompt lengths (random token ids) and output lengths (a
    request stops after its trace output length, capped at ``max_new_tokens`` if given). ``scale``
    shrinks both lengths (at least 1 token each) for small CPU runs, keeping their spread."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for r in trace.requests:
        prompt_len, n_out = max(1, round(r.prompt_len * scale)), max(1, round(r.output_len * scale))
        n_out = n_out if max_new_tokens is None else min(n_out, max_new_tokens)
        prompt = torch.randint(0, vocab_size, (prompt_len,), generator=gen).tolist()
        out.append(Sequence(r.req_id, prompt, n_out, arrival_s=r.arrival_s))
    return out


def sweep_users(make_requests, make_runner, servers=SERVERS, users=(1, 2, 4, 8, 16, 32, 64), *,
                max_num_seqs: int, max_num_tokens: int, max_model_len: int) -> list[dict]:
    """Closed-loop serving for each server and number of concurrent users: one summary row each.
    ``make_requests(n_users)`` builds fresh requests; ``make_runner(server)`` a fresh runner."""
    rows = []
    for server in servers:
        for n in users:
            sched = make_scheduler(server, max_num_seqs, max_num_tokens, max_model_len)
            res = serve(make_requests(n), sched, make_runner(server), users=n)
            rows.append({"server": server, "users": n, **res.summary()})
    return rows
