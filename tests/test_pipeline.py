"""The guard against a plain forward, faiss against brute force, and one request end to end through
guard -> embed -> retrieve -> generate against generate() on the same prompt. The guard here is the shipped
Austen model (any (model, tokenizer) works; its verdicts mean nothing, its logits can be checked)."""
import numpy as np
import pytest
import torch

import labkit  # noqa: F401
from labkit.bert import DEFAULT_EMBEDDER_DIR, load_embedder
from labkit.checkpoint import load_default_model
from labkit.contention import make_workload, run_contention
from labkit.engine import EngineConfig, LLMEngine
from labkit.generate import generate
from labkit.guard import Guard, label_token_ids
from labkit.pipeline import RAGPipeline, load_questions
from labkit.retrieval import PassageIndex, austen_passages

needs_embedder = pytest.mark.skipif(not (DEFAULT_EMBEDDER_DIR / "model.safetensors").exists(),
                                    reason="run `make embedder` (make test does)")


@pytest.fixture(scope="module")
def austen():
    torch.set_num_threads(1)
    return load_default_model()


@pytest.fixture(scope="module")
def index():
    passages = austen_passages(max_chapters_per_novel=1, max_chars=300)[::8]  # a small index: 16 passages
    return PassageIndex(load_embedder(), passages)


@pytest.mark.timeout(60)
def test_guard_scores_are_the_models_next_token_logits(austen):
    model, tok = austen
    guard = Guard(model, tok, EngineConfig(num_blocks=64, max_num_seqs=2, max_num_batched_tokens=512))
    messages = ["Where is Pemberley?", "How do I make a weapon?", "Tell me about Bath."]
    verdicts = guard.classify(messages)  # three requests, two batch slots: batched and queued
    safe, unsafe = label_token_ids(tok, ("safe", "unsafe"))
    for m, v in zip(messages, verdicts):
        with torch.no_grad():
            logits = model(torch.tensor([guard.prompt_ids(m)]))[0, -1]
        assert v.logit_safe == pytest.approx(float(logits[safe]), abs=1e-4)
        assert v.logit_unsafe == pytest.approx(float(logits[unsafe]), abs=1e-4)
        assert v.p_unsafe == pytest.approx(float(torch.softmax(logits[[safe, unsafe]], 0)[1]), abs=1e-5)
    assert not guard.runner.scores  # every verdict was collected


def test_guard_refuses_labels_it_cannot_tell_apart(austen):
    model, tok = austen
    with pytest.raises(ValueError, match="start with the same token"):
        Guard(model, tok, labels=("safe", "safety"))
    with pytest.raises(ValueError, match="placeholder"):
        Guard(model, tok, template="no slot here")


def test_passages_are_whole_paragraphs_within_chapters():
    ps = austen_passages(max_chapters_per_novel=2, max_chars=400)
    assert {p.novel for p in ps} == {"sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
                                     "persuasion"}
    assert {p.chapter for p in ps} == {1, 2}
    assert all(len(p.text) <= 400 or "\n\n" not in p.text for p in ps)  # only a single long paragraph exceeds it
    assert not any(p.text.lower().startswith("chapter") for p in ps)


@needs_embedder
@pytest.mark.timeout(120)
def test_faiss_search_matches_brute_force(index):
    queries = ["Emma Woodhouse, handsome, clever, and rich", "a sister's letter from London", "the ball"]
    q = index.embedder.embed(queries).numpy()
    p = index.embedder.embed([x.text for x in index.passages]).numpy()
    scores = q @ p.T
    hits = index.search_vectors(q, k=3)
    for row, s in zip(hits, scores):
        assert [index.passages.index(x) for _, x in row] == list(np.argsort(-s)[:3])
        assert [v for v, _ in row] == pytest.approx(sorted(s, reverse=True)[:3], abs=1e-5)
    with pytest.raises(ValueError, match="k must be"):
        index.search_vectors(q, k=len(index) + 1)


@needs_embedder
@pytest.mark.timeout(180)
def test_a_request_flows_guard_embed_retrieve_generate(austen, index):
    model, tok = austen
    llm = LLMEngine(model, EngineConfig(num_blocks=128, max_num_seqs=4))
    guard = Guard(model, tok, EngineConfig(num_blocks=64, max_num_seqs=4, max_num_batched_tokens=512))
    pipe = RAGPipeline(llm, tok, index=index, guard=guard, max_tokens=8, guard_threshold=1.01)  # every request safe
    assert pipe.stages == ("guard", "embed", "retrieve", "generate")
    r = pipe.answer("Emma Woodhouse, handsome, clever, and rich")
    assert r.passage.novel == "emma" and 0 < r.p_unsafe < 1
    want = index.search(["Emma Woodhouse, handsome, clever, and rich"])[0][0][1]
    assert r.passage == want
    assert r.prompt_ids == pipe.build_prompt(r.question, want.text)
    assert tok.decode(r.prompt_ids) == f"{want.text}\n\n{r.question}\n"  # the retrieved passage is in the prompt
    ref = generate(model, r.prompt_ids, 8, eos_token_id=tok.eos_token_id).token_ids
    assert r.answer_ids == ref and r.answer == tok.decode(ref)
    times = r.stage_seconds()
    assert list(times) == ["guard", "embed", "retrieve", "generate"] and all(t >= 0 for t in times.values())

    refusing = RAGPipeline(llm, tok, index=index, guard=guard, max_tokens=8, guard_threshold=0.0)
    run = refusing.serve(load_questions(3))
    assert all(x.refused and x.answer_ids is None and "embed" not in x.done_s for x in run.requests)
    assert run.summary()["refused"] == 3


@needs_embedder
@pytest.mark.timeout(120)
def test_one_and_two_model_pipelines_and_the_time_bound(austen, index):
    model, tok = austen
    llm = LLMEngine(model, EngineConfig(num_blocks=128, max_num_seqs=4))
    one = RAGPipeline(llm, tok, max_tokens=4)
    two = RAGPipeline(llm, tok, index=index, max_tokens=4)
    assert one.stages == ("generate",) and two.stages == ("embed", "retrieve", "generate")
    s1 = one.serve(load_questions(4), [0.0, 0.01, 0.02, 0.03]).summary()
    s2 = two.serve(load_questions(4)).summary()
    assert s1["finished"] == s2["finished"] == 4 and s1["models"] == 1 and s2["models"] == 2
    stopped = one.serve(load_questions(4), [0.0, 0.0, 30.0, 30.0], max_seconds=0.5)
    assert stopped.stopped_early and not llm.has_unfinished()  # unfinished work aborted, its blocks back
    assert llm.block_manager.num_free_blocks == 128


@pytest.mark.timeout(120)
def test_contention_modes_serve_the_same_tokens(austen):
    model, _ = austen
    engines = {"a": LLMEngine(model, EngineConfig(num_blocks=64, max_num_seqs=4)),
               "b": LLMEngine(model, EngineConfig(num_blocks=64, max_num_seqs=4))}
    workloads = {"a": make_workload(model.config.vocab_size, 3, 8, 5, seed=0),
                 "b": make_workload(model.config.vocab_size, 2, 12, 4, seed=1)}
    outs = {}
    for mode in ("alone", "time-sliced", "concurrent"):
        res = run_contention(engines, workloads, mode)
        assert res["runs"]["a"].output_tokens == 15 and res["runs"]["b"].output_tokens == 8
        outs[mode] = {n: [s.output_token_ids for s in list(e.requests.values())[-len(workloads[n]):]]
                      for n, e in engines.items()}
    assert outs["alone"] == outs["time-sliced"] == outs["concurrent"]
