"""Batching must not change what a request gets; the scheduler keeps its limits and refuses bad input."""
import pytest
import torch

from labkit.config import LlamaConfig
from labkit.generate import generate
from labkit.kv_cache import ContiguousCache
from labkit.memory_pool import RequestRefusedError
from labkit.model import LlamaForCausalLM
from labkit.scheduler import Scheduler, Sequence, SequenceStatus, fcfs_admit
from labkit.serving import SERVERS, ModelRunner, SimulatedRunner, make_scheduler, serve
from labkit.step_cost import StepCostModel

MAX_LEN = 40


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()  # fp32


def make_requests(n=9, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt_len = int(torch.randint(1, 14, (1,), generator=g))
        new = int(torch.randint(1, 12, (1,), generator=g))
        out.append(Sequence(i, torch.randint(0, vocab, (prompt_len,), generator=g).tolist(), new,
                            arrival_s=0.002 * i))
    return out


@pytest.fixture(scope="module")
def alone(tiny_model):
    """Each request's greedy tokens when it is served by itself."""
    return {seq.seq_id: generate(tiny_model, seq.prompt_ids, seq.max_new_tokens,
                                 cache=ContiguousCache(tiny_model.config, 1, MAX_LEN)).token_ids
            for seq in make_requests()}


class FixedRunner:
    """Every step takes one second and yields token 1: for checks on the schedule alone."""

    def run(self, step):
        return [1] * len(step.seqs), 1.0


@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("users", [None, 4])
def test_batched_greedy_tokens_equal_each_request_alone(tiny_model, alone, server, users):
    reqs = make_requests()
    sched = make_scheduler(server, max_num_seqs=3, max_num_tokens=10**6, max_model_len=MAX_LEN)
    result = serve(reqs, sched, ModelRunner(tiny_model, 3, MAX_LEN), users=users)
    assert max(result.step_batch_sizes) > 1 or server == "one-at-a-time"  # batching really happened
    for seq in reqs:
        assert seq.output_ids == alone[seq.seq_id], f"request {seq.seq_id} ({server}) differs from its run alone"
        assert seq.status is SequenceStatus.FINISHED and len(seq.token_times) == seq.max_new_tokens


def test_admission_respects_slots_kv_room_and_fcfs():
    reqs = make_requests(n=30, seed=1)
    sched = Scheduler(max_num_seqs=4, max_num_tokens=45, max_model_len=MAX_LEN)
    for r in reqs:
        sched.add(r)
    admitted_order, now = [], 0.0
    while sched.has_work():
        step = sched.schedule(now)
        assert len(sched.running) <= 4 and 0 <= sched.used_kv_tokens <= 45
        assert sched.used_kv_tokens == sum(s.reservation for s in sched.running)
        assert sorted(s.slot for s in sched.running) == sorted(set(s.slot for s in sched.running))
        admitted_order += [s.seq_id for s in step.prefill]
        # the head of the queue was refused only for want of a slot or of KV room
        if sched.waiting:
            head = sched.waiting[0]
            assert not sched.free_slots or head.reservation > sched.free_kv_tokens
        now += 1.0
        sched.postprocess(step, [1] * len(step.seqs), now)
    assert admitted_order == [r.seq_id for r in reqs]  # first come, first served
    assert sched.used_kv_tokens == 0 and sorted(sched.free_slots) == [0, 1, 2, 3]


def test_continuous_refills_a_slot_at_once_static_waits_for_the_batch():
    def run(policy):
        reqs = [Sequence(i, [1, 2], n) for i, n in enumerate([2, 6, 3])]
        result = serve(reqs, Scheduler(2, 10**6, MAX_LEN, policy=policy), FixedRunner())
        return reqs, result

    reqs, result = run("continuous")  # request 0 ends after step 2; request 2 starts in step 3
    assert reqs[2].token_times[0] == 3.0 and reqs[2].slot == reqs[0].slot
    assert (result.occupancy()[2] == [2, 1]).all()
    reqs, result = run("static")  # request 2 must wait for request 1 (6 steps)
    assert reqs[2].token_times[0] == 7.0
    assert (result.occupancy()[2:6, reqs[0].slot] == -2).all()  # held idle by finished request 0


def test_fcfs_admit_does_not_overtake():
    assert fcfs_admit([(10, 10), (1, 1)], free_slots=5, free_kv_tokens=15) == 0  # head too big: nobody
    assert fcfs_admit([(1, 1), (1, 1), (1, 1)], free_slots=2, free_kv_tokens=100) == 2
    assert fcfs_admit([(3, 2), (3, 2), (3, 2)], free_slots=9, free_kv_tokens=10) == 2
    assert fcfs_admit([], free_slots=3, free_kv_tokens=3) == 0


def _state(sched):
    return (list(sched.waiting), list(sched.running), list(sched.free_slots), sched.used_kv_tokens)


@pytest.mark.parametrize("prompt_len,new,match", [(30, 11, "max_model_len"), (20, 20, "pool holds")])
def test_request_that_can_never_run_is_refused_and_nothing_changes(prompt_len, new, match):
    sched = Scheduler(max_num_seqs=2, max_num_tokens=30, max_model_len=MAX_LEN)
    sched.add(Sequence(0, [1, 2, 3], 4))
    sched.schedule()
    before = _state(sched)
    with pytest.raises(RequestRefusedError, match=match):
        sched.add(Sequence(1, [5] * prompt_len, new))
    assert _state(sched) == before


def test_bad_requests_are_refused_clearly():
    with pytest.raises(ValueError, match="prompt is empty"):
        Sequence(0, [], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Sequence(0, [1], 0)
    with pytest.raises(ValueError, match="policy"):
        Scheduler(2, 10, 10, policy="greedy")
    sched = Scheduler(2, 100, MAX_LEN)
    seq = Sequence(0, [1], 2)
    sched.add(seq)
    with pytest.raises(ValueError, match="already queued"):
        sched.add(seq)


def test_serve_refuses_a_bad_request_before_serving_any():
    reqs = make_requests(n=4) + [Sequence(99, [1] * 50, 5)]
    with pytest.raises(RequestRefusedError, match="99"):
        serve(reqs, make_scheduler("continuous", 2, 10**6, MAX_LEN), FixedRunner())
    assert all(not r.output_ids for r in reqs)


def test_closed_loop_keeps_users_requests_in_flight():
    reqs = [Sequence(i, [1], 3) for i in range(8)]
    result = serve(reqs, Scheduler(8, 10**6, MAX_LEN), FixedRunner(), users=2)
    assert max(result.step_batch_sizes) == 2  # never more than two users' requests at once
    assert [r.arrival_s for r in reqs] == [0, 0, 3, 3, 6, 6, 9, 9]  # sent as the previous one finished
    s = result.summary()
    assert s["throughput_tok_s"] == pytest.approx(2.0) and s["tpot_mean_s"] == pytest.approx(1.0)


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
    reqs = [Sequence(i, [1] * 20, 5) for i in range(4)]
    result = serve(reqs, make_scheduler("continuous", 4, 10**6, 64), SimulatedRunner(cost))
    assert result.step_seconds[0] == pytest.approx(cost.step_seconds([20] * 4, []))
    assert result.step_seconds[1] == pytest.approx(cost.step_seconds([], [21] * 4))
