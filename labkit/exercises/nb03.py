"""Notebook 03 exercises: the admission rule of continuous batching, the arithmetic intensity of a decode
step, and the latency metrics of a served request."""
import torch

from labkit.exercises import Exercise
from labkit.scheduler import Sequence, fcfs_admit
from labkit.step_cost import arithmetic_intensity


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _admit_inputs(gen):
    waiting = [(_int(gen, 1, 60), _int(gen, 1, 60)) for _ in range(_int(gen, 0, 9))]
    return waiting, _int(gen, 0, 7), _int(gen, 0, 300)


def _intensity_inputs(gen):
    linears = [(64 * _int(gen, 1, 200), 64 * _int(gen, 1, 200)) for _ in range(_int(gen, 1, 8))]
    return linears, [1, 2, 4, 8, 16, 64, 256, 1024, 4096][_int(gen, 0, 9)], [1, 2, 4][_int(gen, 0, 3)]


def _request_metrics(arrival_s: float, token_times: list[float]) -> tuple[float, float, float]:
    seq = Sequence(0, [1], max_new_tokens=len(token_times), arrival_s=arrival_s)
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
    "fcfs_admit": Exercise(
        reference=fcfs_admit, make_inputs=_admit_inputs,
        spec="how many requests from the head of `waiting` (a list of (prompt_len, max_new_tokens), oldest first) "
             "are admitted now: each takes one of `free_slots` and prompt_len + max_new_tokens of `free_kv_tokens`; "
             "the first that does not fit stops admission (first come, first served)."),
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
