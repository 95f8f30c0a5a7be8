"""Workload traces: seeded, clipped to the context, and matching their presets' statistics."""
import math

import numpy as np
import pytest

from labkit.traces import PRESETS, LengthDist, Request, make_trace


def test_same_seed_same_trace_other_seed_other_trace():
    a = make_trace("sharegpt", 200, rate=5.0, seed=3)
    assert a == make_trace("sharegpt", 200, rate=5.0, seed=3)
    assert a.requests != make_trace("sharegpt", 200, rate=5.0, seed=4).requests


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("max_len, cap", [(64, None), (2048, None), (2048, 100)])
def test_every_request_fits_the_context_and_its_cap(preset, max_len, cap):
    trace = make_trace(preset, 2000, rate=50.0, seed=1, max_len=max_len, max_new_tokens=cap)
    for r in trace:
        assert r.prompt_len >= 1 and r.output_len >= 1
        assert r.prompt_len + r.max_new_tokens <= max_len
        assert r.output_len <= r.max_new_tokens
        assert cap is None or r.max_new_tokens <= cap
    assert [r.req_id for r in trace] == list(range(len(trace)))


def test_poisson_arrivals_have_the_requested_rate():
    trace = make_trace("alpaca", 5000, rate=8.0, seed=2)
    arrivals = np.array([r.arrival_s for r in trace])
    assert np.all(np.diff(arrivals) >= 0)
    gaps = np.diff(np.concatenate([[0.0], arrivals]))
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.05)
    assert gaps.std() == pytest.approx(1 / 8.0, rel=0.1)  # exponential gaps: std == mean


def test_infinite_rate_means_everyone_at_time_zero():
    assert all(r.arrival_s == 0.0 for r in make_trace("alpaca", 50, rate=math.inf))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_unclipped_means_match_the_cited_statistics(preset):
    p = PRESETS[preset]
    trace = make_trace(preset, 20000, rate=1.0, seed=0, max_len=10**6)
    s = trace.summary()
    assert s["prompt_mean"] == pytest.approx(p.prompt.mean, rel=0.04)
    assert s["output_mean"] == pytest.approx(p.output.mean, rel=0.04)


def test_presets_cite_the_vllm_paper_and_keep_its_ratios():
    share, alpaca = PRESETS["sharegpt"], PRESETS["alpaca"]
    assert "Fig. 11" in share.source and "Fig. 11" in alpaca.source
    # the paper: ShareGPT prompts 8.4x and outputs 5.8x longer than Alpaca's on average
    assert share.prompt.mean / alpaca.prompt.mean == pytest.approx(8.4, rel=0.02)
    assert share.output.mean / alpaca.output.mean == pytest.approx(5.8, rel=0.02)


def test_bad_arguments_fail_loudly():
    with pytest.raises(ValueError, match="unknown trace preset"):
        make_trace("wikitext")
    with pytest.raises(ValueError):
        make_trace("alpaca", 10, rate=0.0)
    with pytest.raises(ValueError):
        LengthDist(mean=0, sigma=1)
    with pytest.raises(ValueError, match="exceeds its max_new_tokens"):
        Request(0, 0.0, prompt_len=5, output_len=10, max_new_tokens=8)


def test_requests_from_trace_keep_lengths_and_say_how_they_stop():
    from labkit.traces import requests_from_trace

    trace = make_trace("sharegpt", 50, rate=5.0, seed=0, max_len=1024, max_new_tokens=300)
    exact = requests_from_trace(trace, vocab_size=100, seed=1)
    capped = requests_from_trace(trace, vocab_size=100, seed=1, client_cap=True)
    for r, e, c in zip(trace, exact, capped):
        assert len(e.prompt_token_ids) == r.prompt_len and all(0 <= t < 100 for t in e.prompt_token_ids)
        assert e.output_len == r.output_len and e.params.max_tokens == r.output_len and e.params.ignore_eos
        assert c.params.max_tokens == r.max_new_tokens and not c.params.ignore_eos  # the client's cap
        assert c.prompt_token_ids == e.prompt_token_ids and e.arrival_s == r.arrival_s
    small = requests_from_trace(trace, vocab_size=100, scale=0.25, max_new_tokens=20)
    assert all(1 <= s.output_len <= 20 and len(s.prompt_token_ids) >= 1 for s in small)
    with pytest.raises(ValueError, match="scale"):
        requests_from_trace(trace, 100, scale=0)
