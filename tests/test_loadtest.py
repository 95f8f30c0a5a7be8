"""The load generator: its formulas against hand arithmetic, its runs against a live server's own counters."""
from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

import labkit  # noqa: F401
from labkit.checkpoint import DEFAULT_MODEL_DIR, load_pretrained
from labkit.engine import EngineConfig, LLMEngine
from labkit.loadtest import RequestResult, check_url, make_prompts, parse_slo, run_load, summarize
from labkit.loadtest_figures import sweep_figure
from labkit.server import EngineBackend, create_app
from labkit.server.dashboard import LiveDashboard, scrape
from labkit.server.process import ThreadedServer

pytestmark = pytest.mark.timeout(240)


def test_summary_formulas_by_hand():
    # request 1: sent 0, first token 0.2 s, ended 1.2 s, 11 tokens -> TPOT (1.2 - 0.2) / 10 = 0.1
    # request 2: first token 0.5 s, ended 0.9 s, 5 tokens -> TPOT 0.1; request 3: one token (no TPOT); 4: a 503
    rs = [RequestResult(True, None, 200, 0.0, 7, 11, 0.2, 1.2, [0.1] * 10),
          RequestResult(True, None, 200, 0.1, 7, 5, 0.5, 0.9, [0.1] * 4),
          RequestResult(True, None, 200, 0.2, 7, 1, 0.3, 0.3, []),
          RequestResult(False, "http_503", 503, 0.3)]
    s = summarize(rs, wall_s=2.0, slo=parse_slo("ttft=0.4,tpot=0.2"))
    assert rs[0].tpot_s == pytest.approx(0.1) and rs[1].tpot_s == pytest.approx(0.1) and rs[2].tpot_s is None
    assert s["completed"] == 3 and s["errors"] == {"http_503": 1} and s["server_errors"] == 1
    assert s["output_tok_s"] == pytest.approx((11 + 5 + 1) / 2.0)
    assert s["requests_s"] == pytest.approx(3 / 2.0)
    assert s["goodput_rps"] == pytest.approx(2 / 2.0)  # request 2's TTFT 0.5 > 0.4 misses the SLO
    assert s["ttft_s"]["p50"] == pytest.approx(0.3) and s["ttft_s"]["mean"] == pytest.approx((0.2 + 0.5 + 0.3) / 3)
    assert s["tpot_s"]["p99"] == pytest.approx(0.1)
    assert s["e2e_s"]["p90"] == pytest.approx(float(np.percentile([1.2, 0.9, 0.3], 90)))
    with pytest.raises(ValueError, match="unknown metric"):
        parse_slo("latency=3")


def test_only_loopback_targets_unless_allowed():
    assert check_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert check_url("http://localhost:9")
    with pytest.raises(ValueError, match="loopback"):
        check_url("http://10.0.0.7:8000")
    assert check_url("http://10.0.0.7:8000", allow_remote=True)
    with pytest.raises(ValueError):
        check_url("127.0.0.1:8000")


def test_prompt_sets():
    rnd = make_prompts("random", 5, input_len=17, output_len=3, vocab_size=100)
    assert all(len(p.prompt) == 17 and max(p.prompt) < 100 and p.max_tokens == 3 for p in rnd)
    shared = make_prompts("shared-prefix", 40, input_len=8, system_len=30, num_system_prompts=3)
    prefixes = {p.prompt.split("\n\n")[0] for p in shared}
    assert len(prefixes) <= 3 and all(len(x.split()) == 30 for x in prefixes)
    assert all(len(p.prompt.split()) == 12 for p in make_prompts("austen", 6, input_len=12))
    assert make_prompts("sharegpt", 20, seed=1) == make_prompts("sharegpt", 20, seed=1)
    with pytest.raises(ValueError, match="dataset"):
        make_prompts("imdb", 3)


@pytest.fixture(scope="module")
def server():
    torch.set_num_threads(1)
    model, tok = load_pretrained(DEFAULT_MODEL_DIR)
    engine = LLMEngine(model, EngineConfig(num_blocks=512, max_num_seqs=8), clock="wall")
    with ThreadedServer(create_app(EngineBackend(engine, max_waiting=2), tok, "austen")) as s:
        yield s


def test_closed_and_open_loop_agree_with_the_servers_counters(server):
    before = scrape(server.url)
    closed = run_load(server.url, make_prompts("austen", 12, input_len=16, output_len=6), users=4)
    s = closed["summary"]
    assert s["completed"] == 12 and not s["errors"] and s["output_tokens"] == 12 * 6
    for r in closed["requests"]:
        assert r["ttft_s"] <= r["e2e_s"] and len(r["itl_s"]) == 6 - 1  # one chunk per token
    opened = run_load(server.url, make_prompts("random", 8, input_len=10, output_len=4), rate=20.0)
    assert opened["summary"]["completed"] == 8 and opened["summary"]["output_tokens"] == 32
    after = scrape(server.url)
    assert after["generation_tokens_total"] - before.get("generation_tokens_total", 0) == 12 * 6 + 32
    assert after["request_success_total"] - before.get("request_success_total", 0) == 20
    fig = sweep_figure({"engine": [closed]})
    assert len(fig.data) == 3


def test_overload_is_counted_by_type_and_runs_stop_by_themselves(server):
    # capacity 8 running + 2 waiting: 24 users at once see 503s, counted as errors, never as answers
    r = run_load(server.url, make_prompts("austen", 48, input_len=16, output_len=24), users=24)
    s = r["summary"]
    assert s["errors"].get("http_503", 0) > 0 and s["completed"] + s["errors"]["http_503"] == 48
    short = run_load(server.url, make_prompts("austen", 400, input_len=16, output_len=40), users=2, max_duration=1.0)
    assert short["summary"]["wall_s"] < 10 and short["summary"]["num_requests"] == 400
    assert short["summary"]["completed"] < 400


def test_live_dashboard_follows_a_load(server):
    from labkit.loadtest import start_load

    dash = LiveDashboard(server.url)
    future = start_load(server.url, make_prompts("austen", 16, input_len=16, output_len=16), users=8)
    dash.follow(future, interval=0.1, max_seconds=120)
    assert future.result()["summary"]["completed"] == 16
    assert len(dash.samples) >= 2 and max(p["tok_s"] for p in dash.samples) > 0
    assert all(p["total"] == 512 for p in dash.samples)
    assert len(dash.widget.data[0].x) == len(dash.samples) and len(dash.figure().data) == 5
    assert httpx.get(server.url + "/health").status_code == 200
