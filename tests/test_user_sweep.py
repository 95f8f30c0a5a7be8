"""Notebook 03 on the engine: batching never changes a request's tokens; the servers schedule as they claim;
the load test's closed loop and metrics are right; the step-cost model follows its recording; the figures
and the explorer respond to their controls."""
import pytest
import torch

import labkit  # noqa: F401
from labkit.config import LlamaConfig
from labkit.engine import LLMEngine, SamplingParams
from labkit.engine.model_runner import ModelRunner
from labkit.figures.batching import BatchExplorer, occupancy_figure, roofline_figure, roofline_summary, users_figure
from labkit.generate import generate
from labkit.kv_cache import ContiguousCache
from labkit.user_sweep import (SERVERS, ThreadTimeRunner, live_engine, noise_at_one_user, serve, server_config,
                              simulated_engine, sweep_users)
from labkit.model import LlamaForCausalLM
from labkit.step_cost import StepCostModel, recorded_model_config
from labkit.traces import TraceRequest

MAX_LEN = 40


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model: one thread is as fast, and far steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():  # a wide spread of logits: no near-ties in argmax between batch shapes
        p.data.normal_(0, 0.3)
    return model


def make_requests(n=9, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = tuple(torch.randint(0, vocab, (int(torch.randint(1, 14, (1,), generator=g)),), generator=g).tolist())
        new = int(torch.randint(1, 12, (1,), generator=g))
        out.append(TraceRequest(i, prompt, SamplingParams(max_tokens=new, ignore_eos=True), 0.002 * i, new))
    return out


class FixedRunner:
    """Every step takes one second and yields token 1: for checks on the schedule alone."""

    last_step_seconds = 1.0

    def execute(self, out):
        return {s.seq.seq_id: 1 for s in out.scheduled if s.samples}


def fixed_engine(server, max_num_seqs=2, num_blocks=256):
    cfg = server_config(server, num_blocks=num_blocks, block_size=4, max_num_seqs=max_num_seqs)
    mc = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=MAX_LEN)
    return LLMEngine(config=cfg, runner=FixedRunner(), model_config=mc, eos_token_ids=())


@pytest.fixture(scope="module")
def alone(tiny_model):
    """Each request's greedy tokens when it is served by itself."""
    return [generate(tiny_model, list(r.prompt_token_ids), r.output_len,
                     cache=ContiguousCache(tiny_model.config, 1, MAX_LEN)).token_ids for r in make_requests()]


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("users", [None, 4])
def test_batched_greedy_tokens_equal_each_request_alone(tiny_model, alone, server, users):
    reqs = make_requests()
    engine = live_engine(tiny_model, server, 3, MAX_LEN, block_size=4)
    result = serve(engine, reqs, users=users)
    assert result.step_batch_sizes.max() > 1 or server == "one-at-a-time"  # batching really happened
    for r, seq, tokens in zip(reqs, result.sequences, alone):
        assert seq.output_token_ids == tokens, f"request {r.request_id} ({server}) differs from its run alone"
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not bm.runs  # every reservation came back


def test_continuous_refills_a_slot_at_once_static_waits_for_the_batch():
    def run(server):
        reqs = [TraceRequest(i, (1, 2), SamplingParams(max_tokens=n, ignore_eos=True), 0.0, n)
                for i, n in enumerate([2, 6, 3])]
        return serve(fixed_engine(server), reqs)

    res = run("continuous")  # request 0 ends after step 2; request 2 starts in step 3 in its slot
    assert res.sequences[2].token_times[0] == 3.0
    assert res.slots[2].tolist() == [2, 1]
    res = run("static")  # request 2 must wait for request 1 (6 steps)
    assert res.sequences[2].token_times[0] == 7.0
    assert (res.slots[2:6, 0] == -2).all()  # held idle by finished request 0
    assert res.slots[6].tolist() == [2, -1]  # the batch has ended: request 2 gets the lowest slot
    res = run("one-at-a-time")
    assert res.slots.shape[1] == 1 and res.step_batch_sizes.max() == 1


def test_admission_is_first_come_first_served_and_respects_slots_and_pool():
    reqs = make_requests(n=30, seed=1)
    engine = fixed_engine("continuous", max_num_seqs=4, num_blocks=12)  # 48 token slots, reservations up front
    admitted = []

    def watch(eng, out):
        admitted.extend(s.seq_id for s in out.admitted)
        bm = eng.block_manager
        assert len(eng.scheduler.running) <= 4
        assert bm.num_used_blocks == sum(n for _, n in bm.runs.values()) <= 12

    engine.observers.append(watch)
    res = serve(engine, reqs)
    assert admitted == [s.seq_id for s in res.sequences]  # nobody overtook
    assert engine.block_manager.num_free_blocks == 12 and not engine.block_manager.runs


def test_closed_loop_keeps_users_requests_in_flight():
    reqs = [TraceRequest(i, (1,), SamplingParams(max_tokens=3, ignore_eos=True), 0.0, 3) for i in range(8)]
    res = serve(fixed_engine("continuous", max_num_seqs=8), reqs, users=2)
    assert res.step_batch_sizes.max() == 2  # never more than two users' requests at once
    assert [s.arrival_s for s in res.sequences] == [0, 0, 3, 3, 6, 6, 9, 9]  # sent as the previous one finished
    s = res.summary()
    assert s["throughput_tok_s"] == pytest.approx(2.0) and s["tpot_mean_s"] == pytest.approx(1.0)


def test_a_bad_request_is_refused_before_anything_runs():
    reqs = make_requests(n=4) + [TraceRequest(99, (1,) * 50, SamplingParams(max_tokens=5), 0.0, 5)]
    engine = fixed_engine("continuous")
    with pytest.raises(ValueError, match="request 4 of 5 cannot be served, nothing was run"):
        serve(engine, reqs, users=2)
    assert not engine.requests and not engine.history
    with pytest.raises(ValueError, match="users"):
        serve(fixed_engine("continuous"), make_requests(n=2), users=0)
    with pytest.raises(ValueError, match="server"):
        server_config("dynamic")


def test_sweep_reports_medians_and_the_spread_of_repeats():
    reqs = [TraceRequest(i, (1, 2, 3), SamplingParams(max_tokens=4, ignore_eos=True), 0.0, 4) for i in range(8)]
    rows = sweep_users(lambda server: fixed_engine(server, max_num_seqs=4), reqs, users=(1, 2), repeats=3)
    assert len(rows) == 6 and all(r["repeats"] == 3 and len(r["throughput_runs"]) == 3 for r in rows)
    for r in rows:
        assert r["throughput_lo"] <= r["throughput_tok_s"] <= r["throughput_hi"]
    assert noise_at_one_user(rows) == pytest.approx(0.0)  # one user: every server runs the same schedule
    fig = users_figure(rows, "t", reference=rows, reference_note="recorded X")
    assert fig.data[0].error_y.array is not None and any("recorded X" in (t.name or "") for t in fig.data)


def test_thread_time_runner_times_this_threads_work(tiny_model):
    cfg = server_config("continuous", num_blocks=64, block_size=4, max_num_seqs=2)
    runner = ThreadTimeRunner(tiny_model, cfg, MAX_LEN)
    engine = LLMEngine(tiny_model, cfg, runner=runner, eos_token_ids=())
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=3))
    engine.run(max_steps=10)
    assert all(0 < r.seconds < 5 for r in engine.history)
    assert isinstance(runner, ModelRunner)


def test_step_cost_model_follows_the_recorded_roofline():
    from labkit.bench import load

    data = load("roofline")
    cost = StepCostModel.from_roofline(data)
    for r in data["rows"]:
        if r["impl"] == "layer_matmuls":
            assert cost.matmul_ms(r["tokens"]) == pytest.approx(r["median_ms"])
        if r["impl"] == "decode_attention":
            assert cost.decode_attention_ms(r["batch"], r["context"]) == pytest.approx(r["median_ms"])
    steps = [cost.decode_step_seconds(b, 512) for b in (1, 2, 4, 8, 16, 64, 256, 1024)]
    assert steps == sorted(steps)  # more work never takes less time
    assert steps[4] < 1.3 * steps[0]  # memory-bound: 16 sequences cost about what one does
    assert steps[-1] > 4 * steps[0]  # compute- and attention-bound at the far end
    mc = recorded_model_config(data, max_len=64)
    assert (mc.hidden_size, mc.num_hidden_layers, mc.vocab_size) == (4096, 32, 128256)
    engine = simulated_engine("continuous", cost, mc, max_num_seqs=4)
    reqs = [TraceRequest(i, (1,) * 20, SamplingParams(max_tokens=5, ignore_eos=True), 0.0, 5) for i in range(4)]
    res = serve(engine, reqs)
    assert engine.history[0].seconds == pytest.approx(cost.step_seconds([20] * 4, []))
    assert engine.history[1].seconds == pytest.approx(cost.step_seconds([], [21] * 4))
    assert res.summary()["output_tokens"] == 20


def test_figures_build_and_the_explorer_redraws_on_every_control():
    from labkit.bench import load

    runs = {s: serve(fixed_engine(s), make_requests(n=5)) for s in ("static", "continuous")}
    fig = occupancy_figure(runs, "occupancy")
    assert any(bar.marker.color == "lightgrey" for bar in fig.data)  # static's idle slots show
    roof = load("roofline")
    assert len(roofline_figure(roof, "recorded").data) >= 5
    from labkit.bench.roofline import LayerShape

    lines = roofline_summary(roof, list(LayerShape().linears.values()))
    assert lines[0].startswith("batch 1:") and "ceilings cross" in lines[-1]
    ex = BatchExplorer(lambda server, users: serve(fixed_engine(server, max_num_seqs=8), make_requests(n=2 * users),
                                                   users=users), (1, 2, 4), note="fixed steps")
    ex.update()
    shown = [ex.figure.to_json()]
    ex.server.value = "continuous"  # the observer redraws
    shown.append(ex.figure.to_json())
    ex.users.value = 4
    shown.append(ex.figure.to_json())
    assert len(set(shown)) == 3, "a control did not change the figure"
    assert "continuous, 4 users" in ex.figure.layout.title.text
