"""The engine: requests in, tokens out, one step loop.

    step():   out = scheduler.schedule()        which sequences, how many tokens, which blocks
              tokens = runner.execute(out)      one batched forward (or the cost model's prediction)
              scheduler.postprocess(out, tokens) append tokens, retire finished sequences

``LLMEngine`` is what a server drives (``add_request`` / ``step`` / ``abort``); ``LLM.generate`` is the
offline front end with vLLM's shape. The clock is virtual by default: it advances by each step's time
(measured, or predicted by a simulated runner) and skips idle gaps, so a trace replays the same way
however busy this machine is; ``clock="wall"`` follows real time (a live server).
"""
from __future__ import annotations

import dataclasses
import itertools
import time

from labkit.engine.config import EngineConfig
from labkit.engine.model_runner import ModelRunner
from labkit.engine.scheduler import Scheduler
from labkit.engine.sequence import FinishReason, Sequence, SequenceStatus
from labkit.paged import blocks_needed
from labkit.sampling import SamplingParams


@dataclasses.dataclass
class StepRecord:
    """What one step did: for the timeline widget, the memory figures and the tests."""

    step: int
    start_s: float
    seconds: float
    num_seqs: int
    num_prefill_tokens: int  # tokens of prompts (or prompt chunks, or recomputation) computed
    num_decode_tokens: int
    num_blocks_used: int
    num_blocks_free: int
    num_used_slots: int  # slots holding a live token (shared blocks once)
    num_running: int
    num_waiting: int
    num_swapped: int
    admitted: list[int]
    preempted: list[int]
    swapped_out_blocks: int
    swapped_in_blocks: int
    cached_tokens: int  # prompt tokens admitted from the prefix cache this step
    finished: list[int]


class LLMEngine:
    """Serve requests on ``model`` (a LlamaForCausalLM) or on a ``runner`` (e.g. SimulatedRunner) with the
    given :class:`EngineConfig`. ``model_config`` (a LlamaConfig) is needed when there is no model."""

    def __init__(self, model=None, config: EngineConfig | None = None, *, runner=None, model_config=None,
                 eos_token_ids=None, clock: str = "virtual", history_limit: int | None = None):
        config = EngineConfig() if config is None else config
        if clock not in ("virtual", "wall"):
            raise ValueError(f"clock must be 'virtual' or 'wall', got {clock!r}")
        if model is None and (runner is None or model_config is None):
            raise ValueError("give a model, or a runner together with model_config=(a LlamaConfig)")
        self.model_config = model.config if model is not None else model_config
        context = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > context:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's context of {context} tokens")
        self.config = config
        self.max_model_len = config.max_model_len or context
        self.runner = runner if runner is not None else ModelRunner(model, config, self.max_model_len)
        self.scheduler = Scheduler(config, self.max_model_len)
        if eos_token_ids is None:
            eos = self.model_config.eos_token_id
            eos_token_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.clock = clock
        self.now = 0.0
        self._t0 = time.perf_counter()
        self.requests: dict = {}
        self.pending: list[Sequence] = []  # added, not arrived yet (virtual clock)
        self.history: list[StepRecord] = []
        self.observers: list = []  # called as f(engine, scheduler_output) after each forward (labkit.pool_history)
        # a long-running server keeps only the last history_limit steps; the counters stay cumulative
        if history_limit is not None and (not isinstance(history_limit, int) or history_limit < 0):
            raise ValueError(f"history_limit must be an integer >= 0 or None, got {history_limit!r}")
        self.history_limit = history_limit
        self.num_steps = 0
        self.num_preemptions = 0
        self._ids = itertools.count()

    # ---- requests ------------------------------------------------------------------------------
    @property
    def block_manager(self):
        return self.scheduler.block_manager

    def add_request(self, prompt_token_ids, params: SamplingParams | None = None, *, request_id=None,
                    arrival_s: float | None = None, cache_salt: str | None = None) -> Sequence:
        """Queue a request; refuses (ValueError, nothing changed) one that could never be served."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a labkit.sampling.SamplingParams, got {type(params).__name__}")
        vocab = self.model_config.vocab_size
        params.check_vocab(vocab)
        if isinstance(prompt_token_ids, str):
            raise ValueError("add_request takes token ids; encode the text with the model's tokenizer first")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("the prompt is empty; a request needs at least one token")
        for t in prompt:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"prompt token {t!r} is not a token id of this model (integers in [0, {vocab}))")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; max_model_len={self.max_model_len} leaves no room "
                             "for an answer. Shorten the prompt.")
        longest = min(len(prompt) + params.max_tokens, self.max_model_len)
        need = blocks_needed(longest, self.config.block_size)
        if need > self.config.num_blocks:
            raise ValueError(f"this request can grow to {longest} tokens = {need} blocks, but the KV pool has "
                             f"{self.config.num_blocks}: it could never finish. Lower max_tokens or give the pool more "
                             "blocks.")
        if not self.config.enable_chunked_prefill and longest > self.config.max_num_batched_tokens:
            raise ValueError(f"this request can grow to {longest} tokens, more than max_num_batched_tokens="
                             f"{self.config.max_num_batched_tokens}; without chunked prefill a (re-)prefill that long "
                             "never fits a step. Enable chunked prefill or raise max_num_batched_tokens.")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt must be a string or None, got {type(cache_salt).__name__}")
        request_id = next(self._ids) if request_id is None else request_id
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = self._clock()
        seq = Sequence(request_id, prompt, params, arrival_s=now if arrival_s is None else float(arrival_s),
                       cache_salt=cache_salt, eos_token_ids=self.eos_token_ids)
        reserve = self.block_manager.blocks_to_reserve(seq)  # contiguous: the reservation must fit the pool
        if reserve > self.config.num_blocks:
            raise ValueError(f"request {request_id!r} reserves {reserve} blocks (reserve={self.config.reserve!r}), but "
                             f"the KV pool has {self.config.num_blocks}: it could never be admitted. Give the pool "
                             "more blocks, lower max_tokens or max_model_len, or reserve less.")
        self.requests[request_id] = seq
        if seq.arrival_s > now:
            self.pending.append(seq)
            self.pending.sort(key=lambda s: (s.arrival_s, s.seq_id))
        else:
            self.scheduler.add(seq)
        return seq

    def abort(self, request_id) -> bool:
        """Stop a request now (between steps): its blocks come back. False if it had already finished."""
        if request_id not in self.requests:
            raise KeyError(f"no request {request_id!r}")
        seq = self.requests[request_id]
        if seq.is_finished:
            return False
        if seq in self.pending:
            self.pending.remove(seq)
            seq.status, seq.finish_reason, seq.finished_s = SequenceStatus.FINISHED, FinishReason.ABORT, self._clock()
            return True
        self.scheduler.abort(seq, self._clock())
        return True

    def forget(self, request_id) -> None:
        """Drop a finished request's record, so a server that runs for days keeps flat memory."""
        seq = self.requests.get(request_id)
        if seq is None:
            raise KeyError(f"no request {request_id!r}")
        if not seq.is_finished:
            raise ValueError(f"request {request_id!r} is still {seq.status.value}; abort it before forgetting it")
        del self.requests[request_id]

    def reset_clock(self) -> None:
        """Start the clock at 0 now (after warm-up work such as CUDA-graph capture that no request should see)."""
        self.now, self._t0 = 0.0, time.perf_counter()

    def has_unfinished(self) -> bool:
        return bool(self.pending) or self.scheduler.has_work()

    # ---- the loop ------------------------------------------------------------------------------
    def _clock(self) -> float:
        return self.now if self.clock == "virtual" else time.perf_counter() - self._t0

    def _release_arrivals(self) -> None:
        now = self._clock()
        while self.pending and self.pending[0].arrival_s <= now:
            self.scheduler.add(self.pending.pop(0))

    def step(self) -> list[Sequence]:
        """One step. Returns the sequences that got a new token (finished ones included)."""
        self._release_arrivals()
        if not self.scheduler.has_work():
            if self.pending and self.clock == "virtual":
                self.now = self.pending[0].arrival_s  # idle: jump to the next arrival
                self._release_arrivals()
            else:
                return []
        start = self._clock()
        out = self.scheduler.schedule()
        if not out.scheduled and not self.scheduler.running:
            raise RuntimeError(f"no progress possible: {len(self.scheduler.waiting)} waiting, "
                               f"{len(self.scheduler.swapped)} swapped, {self.block_manager.num_free_blocks} blocks free")
        for seq in out.admitted:
            if seq.admitted_s is None:
                seq.admitted_s = start
        tokens = self.runner.execute(out)
        sampled = [s.seq for s in out.scheduled if s.samples]  # before postprocess moves num_computed_tokens on
        decodes = sum(1 for s in out.scheduled if s.num_new_tokens == 1 and s.samples and s.seq.num_output_tokens)
        if self.clock == "virtual":
            self.now += self.runner.last_step_seconds
        now = self._clock()
        for observe in self.observers:  # the pool as this step's forward saw it, before anyone leaves
            observe(self, out)
        finished = self.scheduler.postprocess(out, tokens, now)
        bm = self.block_manager
        prefill = out.num_batched_tokens - decodes  # prompt chunks and recomputation
        self.history.append(StepRecord(
            step=self.num_steps, start_s=start, seconds=now - start, num_seqs=len(out.scheduled),
            num_prefill_tokens=prefill, num_decode_tokens=decodes,
            num_blocks_used=bm.num_used_blocks, num_blocks_free=bm.num_free_blocks,
            num_used_slots=bm.num_used_slots(), num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting), num_swapped=len(self.scheduler.swapped),
            admitted=[s.seq_id for s in out.admitted], preempted=[s.seq_id for s in out.preempted],
            swapped_out_blocks=len(out.swap_out), swapped_in_blocks=len(out.swap_in),
            cached_tokens=sum(s.num_cached_tokens for s in out.admitted), finished=[s.seq_id for s in finished]))
        self.num_steps += 1
        self.num_preemptions += len(out.preempted)
        if self.history_limit is not None and len(self.history) > self.history_limit:
            del self.history[:len(self.history) - self.history_limit]
        return sampled

    def run(self, max_steps: int | None = None) -> list[Sequence]:
        """Step until every request has finished; returns them in request order."""
        steps = 0
        while self.has_unfinished():
            if max_steps is not None and steps >= max_steps:
                raise RuntimeError(f"not finished after {max_steps} steps: {len(self.scheduler.running)} running, "
                                   f"{len(self.scheduler.waiting)} waiting, {len(self.scheduler.swapped)} swapped")
            self.step()
            steps += 1
        return list(self.requests.values())

    def stats(self) -> dict:
        """Counters a /metrics endpoint exports (vLLM's names where it has them)."""
        bm = self.block_manager
        hits = bm.bm.stats
        return {"num_requests_running": len(self.scheduler.running),
                "num_requests_waiting": len(self.scheduler.waiting) + len(self.pending),
                "num_requests_swapped": len(self.scheduler.swapped),
                "kv_blocks_used": bm.num_used_blocks, "kv_blocks_free": bm.num_free_blocks,
                "kv_blocks_total": bm.num_blocks,
                "prefix_cache_queries_tokens": hits["queried_tokens"], "prefix_cache_hits_tokens": hits["hit_tokens"],
                "num_preemptions": self.num_preemptions, "num_steps": self.num_steps}


@dataclasses.dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    ttft_s: float
    latency_s: float


class LLM:
    """Offline generation, vLLM's shape: ``LLM(model, tokenizer).generate(prompts, SamplingParams(...))``.
    ``engine_args`` are :class:`EngineConfig` fields."""

    def __init__(self, model, tokenizer=None, **engine_args):
        self.tokenizer = tokenizer
        self.engine = LLMEngine(model, EngineConfig(**engine_args))

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 cache_salt: str | None = None) -> list[RequestOutput]:
        """``prompts``: strings (needs a tokenizer) or lists of token ids. One SamplingParams for all, or one each."""
        if isinstance(prompts, (str,)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        ids = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer: LLM(model, tokenizer)")
                p = self.tokenizer.encode(p)
            ids.append(list(p))
        engine = self.engine
        seqs = [engine.add_request(p, sp, cache_salt=cache_salt) for p, sp in zip(ids, params)]
        while any(not s.is_finished for s in seqs):
            engine.step()
        return self._outputs(seqs)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """One conversation (``[{"role": ..., "content": ...}, ...]``) rendered with the model's own chat
        template (``tokenizer.apply_chat_template``, as transformers and vLLM's ``LLM.chat`` do), then generated."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template (an instruct model's tokenizer_config.json or GGUF "
                             "metadata carries one); use generate() with a plain prompt")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        seq = self.engine.add_request(list(ids), sampling_params)
        while not seq.is_finished:
            self.engine.step()
        return self._outputs([seq])[0]

    def _outputs(self, seqs) -> list[RequestOutput]:
        dec = self.tokenizer.decode if self.tokenizer is not None else None
        return [RequestOutput(s.seq_id, s.prompt_token_ids, s.output_token_ids,
                              dec(s.output_token_ids) if dec else None, s.finish_reason.value, s.ttft, s.latency)
                for s in seqs]
