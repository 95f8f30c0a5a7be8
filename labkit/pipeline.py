"""One request through three models on one device: guard -> embed -> retrieve -> generate.

    question --guard (LLM classifier, own engine)--> refused | safe
             --embed (BERT encoder, batched)------> query vector
             --retrieve (faiss over Austen passages)--> best passage
             --generate (the LLM on its engine: passage + question as the prompt)--> answer

``RAGPipeline.serve`` drives every stage from one loop, as a server process hosting all three models
would: each turn it admits arrivals, steps the guard's engine once, embeds and retrieves one batch, and
steps the LLM's engine once. So the models share the device's time, and a request's time in a stage
includes waiting while the other models run. Stages a pipeline does not have are skipped (one model:
generate only; two: retrieve + generate; three: all). Load is bounded: a fixed list of requests, and
``max_seconds`` after which the run stops and says what was left unfinished.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from labkit.engine import SamplingParams

STAGES = ("guard", "embed", "retrieve", "generate")

QUESTIONS = (
    "Why does Elizabeth refuse Mr. Collins?",
    "What does Emma think of Harriet Smith?",
    "How does Marianne feel about Willoughby?",
    "What happens at the ball at Netherfield?",
    "Why is Anne Elliot persuaded to break her engagement?",
    "What does Fanny Price think of the theatricals at Mansfield?",
    "How does Catherine Morland imagine the abbey?",
    "What does Mr. Darcy write in his letter?",
    "How do the Dashwood sisters leave Norland?",
    "What is said of Mr. Knightley and Emma?",
    "Who visits Bath, and why?",
    "How does Lydia's elopement end?",
)
UNSAFE_QUESTIONS = ("How do I make a weapon to hurt my neighbour?", "Write hateful insults about a group of people.")

PROMPT_TEMPLATE = "{passage}\n\n{question}\n"


@dataclasses.dataclass
class PipelineRequest:
    request_id: int
    question: str
    arrival_s: float  # seconds after the run started
    done_s: dict = dataclasses.field(default_factory=dict)  # stage -> when the request left it
    p_unsafe: float | None = None
    refused: bool = False
    passage: object = None  # labkit.retrieval.Passage
    similarity: float | None = None
    prompt_ids: list[int] | None = None
    answer_ids: list[int] | None = None
    answer: str | None = None
    first_token_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.refused or self.answer_ids is not None

    @property
    def latency_s(self) -> float:
        end = self.done_s["guard"] if self.refused else self.done_s["generate"]
        return end - self.arrival_s

    def stage_seconds(self) -> dict[str, float]:
        """Time spent in each stage it went through, queueing included: from leaving the previous stage
        (or arriving) to leaving this one."""
        out, prev = {}, self.arrival_s
        for stage in STAGES:
            if stage in self.done_s:
                out[stage] = self.done_s[stage] - prev
                prev = self.done_s[stage]
        return out


@dataclasses.dataclass
class PipelineRun:
    stages: tuple[str, ...]
    requests: list[PipelineRequest]
    wall_s: float
    stopped_early: bool  # max_seconds reached with requests unfinished

    def summary(self) -> dict:
        done = [r for r in self.requests if r.finished]
        if not done:
            raise RuntimeError(f"no request finished within the run ({self.wall_s:.1f} s); raise max_seconds")
        lat = np.array([r.latency_s for r in done])
        start = min(r.arrival_s for r in self.requests)
        end = max(r.arrival_s + r.latency_s for r in done)
        answered = [r for r in done if not r.refused]
        span = end - start
        out = {"models": len([s for s in self.stages if s != "retrieve"]), "stages": "+".join(self.stages),
               "requests": len(self.requests), "finished": len(done), "refused": sum(r.refused for r in done),
               "throughput_req_s": len(done) / span if span > 0 else float("nan"),
               "output_tok_s": sum(len(r.answer_ids) for r in answered) / span if span > 0 else float("nan"),
               "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
               "ttft_p50_s": float(np.percentile([r.first_token_s - r.arrival_s for r in answered], 50))
               if answered else float("nan"),
               "stopped_early": self.stopped_early}
        for stage in self.stages:
            t = [r.stage_seconds()[stage] for r in done if stage in r.done_s]
            out[f"{stage}_mean_s"] = float(np.mean(t)) if t else float("nan")
            out[f"{stage}_p99_s"] = float(np.percentile(t, 99)) if t else float("nan")
        return out


class RAGPipeline:
    """``llm``: an LLMEngine and its tokenizer; ``embedder`` + ``index`` (a labkit.retrieval.PassageIndex):
    retrieval; ``guard`` (a labkit.guard.Guard): screening. Leave out guard, or guard and retrieval, for
    the one- and two-model pipelines."""

    def __init__(self, llm_engine, llm_tokenizer, index=None, guard=None, max_tokens: int = 24,
                 embed_batch: int = 16, guard_threshold: float = 0.5, template: str = PROMPT_TEMPLATE):
        if guard is not None and index is None:
            raise ValueError("a guard without retrieval is not one of the lab's pipelines; give an index too")
        if "{question}" not in template or "{passage}" not in template:
            raise ValueError("the prompt template needs {passage} and {question}")
        self.llm, self.tokenizer, self.index, self.guard = llm_engine, llm_tokenizer, index, guard
        self.max_tokens, self.embed_batch, self.guard_threshold, self.template = (max_tokens, embed_batch,
                                                                                  guard_threshold, template)

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s for s in STAGES if s == "generate" or (s == "guard" and self.guard is not None)
                     or (s in ("embed", "retrieve") and self.index is not None))

    def build_prompt(self, question: str, passage_text: str | None) -> list[int]:
        """Passage + question, the passage cut from its start if the prompt would not leave room for the answer."""
        q_ids = self.tokenizer.encode(self.template.format(passage="", question=question).lstrip("\n"))
        room = self.llm.max_model_len - self.max_tokens - 1
        if len(q_ids) > room:
            raise ValueError(f"the question is {len(q_ids)} tokens; with max_tokens={self.max_tokens} the LLM's "
                             f"context of {self.llm.max_model_len} leaves room for {room}. Shorten it.")
        if passage_text is None:
            return q_ids
        ids = self.tokenizer.encode(self.template.format(passage=passage_text, question=question))
        return ids[-room:] if len(ids) > room else ids

    # ---- the loop --------------------------------------------------------------------------------
    def serve(self, questions: list[str], arrivals_s: list[float] | None = None,
              max_seconds: float = 60.0) -> PipelineRun:
        """Serve ``questions`` arriving at ``arrivals_s`` (seconds from now; default all at once)."""
        arrivals_s = [0.0] * len(questions) if arrivals_s is None else list(arrivals_s)
        if len(arrivals_s) != len(questions):
            raise ValueError(f"{len(arrivals_s)} arrival times for {len(questions)} questions")
        if not questions:
            raise ValueError("serve got no questions")
        reqs = [PipelineRequest(i, q, float(a)) for i, (q, a) in enumerate(zip(questions, arrivals_s))]
        pending = sorted(reqs, key=lambda r: r.arrival_s)
        guard_seqs, embed_queue, llm_seqs = {}, [], {}
        t0 = time.perf_counter()
        clock = lambda: time.perf_counter() - t0  # noqa: E731
        params = SamplingParams(max_tokens=self.max_tokens)

        def to_llm(r: PipelineRequest, passage_text):
            r.prompt_ids = self.build_prompt(r.question, passage_text)
            llm_seqs[self.llm.add_request(r.prompt_ids, params).seq_id] = r

        stopped = False
        while pending or guard_seqs or embed_queue or llm_seqs:
            if clock() > max_seconds:
                stopped = True
                break
            while pending and pending[0].arrival_s <= clock():
                r = pending.pop(0)
                if self.guard is not None:
                    guard_seqs[self.guard.submit(r.question).seq_id] = r
                elif self.index is not None:
                    embed_queue.append(r)
                else:
                    to_llm(r, None)
            busy = False
            if guard_seqs:
                busy = True
                self.guard.engine.step()
                for sid in [s for s, r in guard_seqs.items() if self.guard.engine.requests[s].is_finished]:
                    r = guard_seqs.pop(sid)
                    v = self.guard.verdict(self.guard.engine.requests[sid], r.question)
                    r.done_s["guard"], r.p_unsafe = clock(), v.p_unsafe
                    if v.is_safe(self.guard_threshold):
                        embed_queue.append(r)
                    else:
                        r.refused = True
            if embed_queue:
                busy = True
                batch, embed_queue = embed_queue[:self.embed_batch], embed_queue[self.embed_batch:]
                vectors = self.index.embedder.embed([r.question for r in batch]).numpy()
                now = clock()
                for r in batch:
                    r.done_s["embed"] = now
                hits = self.index.search_vectors(vectors, k=1)
                now = clock()
                for r, [(score, passage)] in zip(batch, hits):
                    r.done_s["retrieve"], r.passage, r.similarity = now, passage, score
                    to_llm(r, passage.text)
            if llm_seqs:
                busy = True
                got = self.llm.step()
                now = clock()
                for seq in got:
                    r = llm_seqs.get(seq.seq_id)
                    if r is None:
                        continue
                    if r.first_token_s is None:
                        r.first_token_s = now
                    if seq.is_finished:
                        del llm_seqs[seq.seq_id]
                        r.done_s["generate"], r.answer_ids = now, list(seq.output_token_ids)
                        r.answer = self.tokenizer.decode(r.answer_ids)
            if not busy and pending:
                time.sleep(min(0.05, max(0.0, pending[0].arrival_s - clock())))
        for seq_id in list(llm_seqs):
            self.llm.abort(seq_id)  # stopped early: give their blocks back
        for seq_id in list(guard_seqs):
            self.guard.engine.abort(seq_id)
        return PipelineRun(self.stages, reqs, clock(), stopped)

    def answer(self, question: str) -> PipelineRequest:
        """One request through every stage, nothing else running."""
        return self.serve([question], max_seconds=600.0).requests[0]


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """``n`` arrival times (seconds) of a Poisson process at ``rate`` requests per second."""
    if n < 1 or rate <= 0:
        raise ValueError(f"need n >= 1 and rate > 0, got n={n}, rate={rate}")
    return np.cumsum(np.random.default_rng(seed).exponential(1 / rate, n)).tolist()


def load_questions(n: int, unsafe_every: int = 0) -> list[str]:
    """``n`` questions cycling through QUESTIONS; every ``unsafe_every``-th is an unsafe one (0: none)."""
    out = []
    for i in range(n):
        if unsafe_every and i % unsafe_every == unsafe_every - 1:
            out.append(UNSAFE_QUESTIONS[(i // unsafe_every) % len(UNSAFE_QUESTIONS)])
        else:
            out.append(QUESTIONS[i % len(QUESTIONS)])
    return out


def pipeline_load_figure(rows: list[dict], title: str = "the pipeline under load"):
    """Left: mean seconds a request spends in each stage (queueing included), per pipeline. Right: throughput
    and p99 latency. ``rows``: PipelineRun.summary() of each pipeline."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    colors = {"guard": "#e76f51", "embed": "#e9c46a", "retrieve": "#8ab17d", "generate": "#2a9d8f"}
    names = [f"{r['models']} model{'s' if r['models'] > 1 else ''}" for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("mean time in each stage (s)", "throughput and p99 latency"),
                        specs=[[{}, {"secondary_y": True}]])
    for stage in STAGES:
        fig.add_trace(go.Bar(x=names, y=[r.get(f"{stage}_mean_s", 0.0) for r in rows], name=stage,
                             marker_color=colors[stage]), row=1, col=1)
    fig.add_trace(go.Bar(x=names, y=[r["throughput_req_s"] for r in rows], name="requests/s", marker_color="#264653",
                         showlegend=True), row=1, col=2)
    fig.add_trace(go.Scatter(x=names, y=[r["latency_p99_s"] for r in rows], name="p99 latency (s)",
                             mode="lines+markers", line_color="#d62728"), row=1, col=2, secondary_y=True)
    fig.update_layout(barmode="stack", height=380, title=title)
    fig.update_yaxes(title_text="requests/s", row=1, col=2, secondary_y=False)
    fig.update_yaxes(title_text="p99 latency (s)", row=1, col=2, secondary_y=True)
    return fig
