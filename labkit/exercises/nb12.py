"""Notebook 12 exercises: the load test's metrics by their formulas, and why a one-at-a-time server falls over."""
import torch

from labkit.exercises import Exercise
from labkit.loadtest import goodput, tpot
from labkit.server.naive import burst_ttft


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _float(gen, lo, hi):
    return round(lo + (hi - lo) * float(torch.rand(1, generator=gen)), 4)


def _tpot_inputs(gen):
    ttft = _float(gen, 0.01, 2.0)
    return round(ttft + _float(gen, 0.0, 5.0), 4), ttft, _int(gen, 0, 60)


def _goodput_inputs(gen):
    n = _int(gen, 1, 12)
    ttft = [_float(gen, 0.01, 2.0) for _ in range(n)]
    tpots = [None if _int(gen, 0, 5) == 0 else _float(gen, 0.005, 0.2) for _ in range(n)]
    slo_ttft = None if _int(gen, 0, 4) == 0 else _float(gen, 0.1, 1.5)
    slo_tpot = None if _int(gen, 0, 4) == 0 else _float(gen, 0.01, 0.15)
    return ttft, tpots, _float(gen, 1.0, 30.0), slo_ttft, slo_tpot


def _burst_inputs(gen):
    return _int(gen, 1, 40), _float(gen, 0.05, 3.0), _float(gen, 0.001, 0.2)


EXERCISES = {
    "tpot": Exercise(
        reference=tpot, make_inputs=_tpot_inputs, compare="allclose",
        spec="vLLM's time per output token: (e2e_s - ttft_s) / (n - 1) for n >= 2 output tokens, None otherwise."),
    "goodput": Exercise(
        reference=goodput, make_inputs=_goodput_inputs, compare="allclose",
        spec="completed requests per second meeting every SLO that is not None: ttft <= ttft_slo_s and "
             "tpot <= tpot_slo_s (a tpot of None, a one-token answer, meets any TPOT SLO), divided by wall_s."),
    "burst_ttft": Exercise(
        reference=burst_ttft, make_inputs=_burst_inputs, compare="allclose",
        spec="num_users requests reach a one-at-a-time server together; each answer takes service_s and its first "
             "token comes first_token_s after it starts: the list of their TTFTs in serving order."),
}
