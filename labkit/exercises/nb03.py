"""Notebook 03 exercises: one step of the continuous-batching scheduler (checked against the engine's own
``Scheduler.schedule`` on random states), the arithmetic intensity of a decode step, and the latency
metrics of a served request."""
import torch

from labkit.engine import EngineConfig, SamplingParams, Sequence, SequenceStatus
from labkit.engine.scheduler import Scheduler
from labkit.exercises import Exercise
from labkit.step_cost import arithmetic_intensity

MAX_MODEL_LEN = 4096  # long enough that no reservation here is capped by the context


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def engine_schedule_step(running, waiting, free_blocks, block_size, max_num_seqs, token_budget):
    """What the engine's scheduler does with this state: continuous batching, contiguous reservations of
    prompt + max_tokens, no chunked prefill. ``running``: [(seq_id, num_tokens)], each ready to decode;
    ``waiting``: [(seq_id, prompt_len, max_tokens)]; the pool's free blocks are one gap after the running
    reservations. Returns ([(seq_id, tokens scheduled)], [admitted seq_id])."""
    held = []
    for sid, num_tokens in running:  # a running sequence: its prompt, then one sampled token not computed yet
        seq = Sequence(sid, [1] * (num_tokens - 1), SamplingParams(max_tokens=8))
        seq.token_ids.append(1)
        held.append(seq)
    reserved = sum(-(-(s.num_prompt_tokens + 8) // block_size) for s in held)
    cfg = EngineConfig(num_blocks=reserved + free_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=token_budget, batching="continuous", allocation="contiguous",
                       preemption="none", enable_chunked_prefill=False, watermark=0.0)
    sched = Scheduler(cfg, MAX_MODEL_LEN)
    for seq in held:
        sched.block_manager.allocate(seq, seq.num_tokens - 1)  # its reservation, placed first fit from block 0
        seq.num_computed_tokens = seq.num_tokens - 1
        seq.status = SequenceStatus.RUNNING
        sched.running.append(seq)
    for sid, prompt_len, max_tokens in waiting:
        sched.add(Sequence(sid, [1] * prompt_len, SamplingParams(max_tokens=max_tokens)))
    out = sched.schedule()
    return [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled], [s.seq_id for s in out.admitted]


# Edge cases (every trial runs them, then one random state): (running, waiting, free_blocks, block_size,
# max_num_seqs, token_budget)
_EDGE_CASES = [
    ([], [], 4, 1, 4, 16),  # nothing to do
    ([(0, 5), (1, 9), (2, 3)], [(3, 4, 4)], 50, 4, 8, 2),  # budget smaller than the decodes: the newest waits
    ([(0, 5)], [(1, 30, 10), (2, 2, 2)], 8, 4, 8, 100),  # the head does not fit; the small one must not overtake
    ([(0, 5), (1, 6)], [(2, 3, 3), (3, 3, 3)], 40, 2, 3, 100),  # one slot left
    ([], [(0, 10, 5), (1, 10, 5), (2, 10, 5)], 100, 8, 8, 25),  # the third prompt does not fit the budget
    ([(0, 7)], [(1, 6, 10)], 4, 4, 4, 100),  # 16 tokens = 4 blocks: exactly fits
    ([(0, 7)], [(1, 6, 11)], 4, 4, 4, 100),  # 17 tokens = 5 blocks: does not
]


def _random_state(gen):
    block_size = [1, 2, 4, 8, 16][_int(gen, 0, 5)]
    n_run = _int(gen, 0, 8)
    running = [(i, _int(gen, 2, 100)) for i in range(n_run)]
    waiting = [(n_run + i, _int(gen, 1, 60), _int(gen, 1, 60)) for i in range(_int(gen, 0, 8))]
    free = _int(gen, 0 if running else 1, 60)
    max_num_seqs = _int(gen, max(1, n_run), max(1, n_run) + 5)
    budget = _int(gen, 1, 200)
    return running, waiting, free, block_size, max_num_seqs, budget


def _schedule_inputs(gen):
    return (_EDGE_CASES + [_random_state(gen)],)


def _run_cases(fn, cases):
    """``fn`` on every state, its answer as ([(seq_id, tokens)], [seq_id]) so lists and tuples compare equal."""
    out = []
    for state in cases:
        answer = fn(*state)
        try:
            scheduled, admitted = answer
            out.append(([tuple(x) for x in scheduled], list(admitted)))
        except (TypeError, ValueError):
            out.append(answer)  # not a (scheduled, admitted) pair: shown as it is
    return out


def _reference_schedule(cases):
    return _run_cases(engine_schedule_step, cases)


def _explain_schedule(args, got, expected) -> str:
    (cases,) = args
    c = next(k for k, (g, e) in enumerate(zip(got, expected)) if g != e)
    running, waiting, free, block_size, max_num_seqs, budget = cases[c]
    lines = [f"  running {running}, waiting {waiting},", f"  free_blocks={free}, block_size={block_size}, "
             f"max_num_seqs={max_num_seqs}, token_budget={budget}:"]
    g, e = got[c], expected[c]
    if not isinstance(g, tuple):
        return "\n".join(lines + [f"    return (scheduled, admitted); yours returned {g!r}"])
    for name, gv, ev in zip(("scheduled", "admitted"), g, e):
        if list(gv) != list(ev):
            lines.append(f"    {name:9s} yours: {list(gv)}   expected: {ev}")
    return "\n".join(lines)


def _intensity_inputs(gen):
    linears = [(64 * _int(gen, 1, 200), 64 * _int(gen, 1, 200)) for _ in range(_int(gen, 1, 8))]
    return linears, [1, 2, 4, 8, 16, 64, 256, 1024, 4096][_int(gen, 0, 9)], [1, 2, 4][_int(gen, 0, 3)]


def _request_metrics(arrival_s: float, token_times: list[float]) -> tuple[float, float, float]:
    seq = Sequence(0, [1], SamplingParams(max_tokens=len(token_times)), arrival_s=arrival_s)
    seq.token_times = list(token_times)
    return seq.ttft, seq.tpot, seq.latency


def _metrics_inputs(gen):
    arrival = float(torch.rand(1, generator=gen)) * 10
    first = arrival + float(torch.rand(1, generator=gen)) * 5
    gaps = (torch.rand(_int(gen, 0, 30), generator=gen) * 0.1).tolist()
    times = [first]
    for g in gaps:
        times.append(times[-1] + g)
    return arrival, times


EXERCISES = {
    "schedule_step": Exercise(
        reference=_reference_schedule, make_inputs=_schedule_inputs, explain=_explain_schedule, trials=30,
        adapt=lambda fn: (lambda cases: _run_cases(fn, cases)),
        spec="one step of continuous batching: every running sequence, oldest first, decodes 1 token while the "
             "token budget lasts; then waiting requests are admitted first come first served while a batch slot "
             "is free, the whole prompt fits the budget left and the reservation ceil((prompt_len + max_tokens) / "
             "block_size) fits the free blocks; the first that does not fit stops admission. Returns "
             "(scheduled [(seq_id, tokens)], admitted [seq_id])."),
    "decode_intensity": Exercise(
        reference=arithmetic_intensity, make_inputs=_intensity_inputs, compare="allclose", atol=0, rtol=1e-9,
        spec="FLOP per byte of `tokens` rows through linears of (in, out) features: 2*tokens*in*out FLOPs each; "
             "bytes = dtype_bytes * (weights in*out + inputs tokens*in + outputs tokens*out), summed."),
    "request_metrics": Exercise(
        reference=_request_metrics, make_inputs=_metrics_inputs, compare="allclose", atol=1e-12, rtol=1e-9,
        spec="(TTFT, TPOT, latency) of a request that arrived at arrival_s and got its tokens at token_times: "
             "TTFT from arrival to the first token, TPOT the mean gap between later tokens (0 for one token), "
             "latency from arrival to the last token."),
}
