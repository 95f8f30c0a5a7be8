"""One record per request: its tokens, where its K/V live, what happened to it and when.

The engine's unit of progress is vLLM v1's: ``num_computed_tokens`` counts the tokens whose K/V are
in the cache. Every step the scheduler gives a sequence ``num_tokens - num_computed_tokens`` new tokens
to compute (or a chunk of them); when a step brings it level, the model's logits at its last token
give the next token::

    token_ids   | prompt ................ | output ...... |
                | cached (prefix hit) | computed        |x|   x: sampled, no K/V yet -> next step's input
                0           num_cached_tokens   num_computed_tokens   num_tokens

So a prefill, a chunk of a prefill, a decode and the re-prefill after preemption by recompute are the
same operation with different counts.
"""
from __future__ import annotations

import dataclasses
import enum

from labkit.paged import blocks_needed
from labkit.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted by recompute (its K/V are gone)
    RUNNING = "running"  # holds blocks; scheduled every step until it finishes
    SWAPPED = "swapped"  # preempted by swap: its K/V wait in CPU memory
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_tokens reached (or the model's context)
    STOP = "stop"  # EOS or a stop token
    ABORT = "abort"  # the client went away


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request inside the engine. Times are seconds on the engine's clock (see LLMEngine.clock)."""

    seq_id: int
    prompt_token_ids: list[int]
    params: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    arrival_s: float = 0.0
    cache_salt: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    # --- state -----------------------------------------------------------------------------
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at the last admission
    block_table: list[int] = dataclasses.field(default_factory=list)  # a copy, refreshed each step
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # --- timings ---------------------------------------------------------------------------
    admitted_s: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)  # when each output token came
    finished_s: float | None = None

    def __post_init__(self):
        self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.seq_id}: the prompt is empty; a request needs at least one token")
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.generator = self.params.make_generator()  # the request's own random stream

    # --- counts ----------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_new_tokens(self) -> int:
        """Tokens still to compute before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def max_num_tokens(self) -> int:
        """The longest this request can grow: prompt + max_tokens (what a contiguous cache reserves)."""
        return self.num_prompt_tokens + self.params.max_tokens

    def num_blocks(self, block_size: int) -> int:
        return blocks_needed(self.num_tokens, block_size)

    @property
    def is_prefill(self) -> bool:
        """More than one token to compute: a (re-)prefill, not a decode."""
        return self.num_new_tokens > 1 or self.num_output_tokens == 0

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    # --- metrics (vLLM's definitions; the formulas are the docstrings) ----------------------
    @property
    def ttft(self) -> float:
        """Time to first token: first output token - arrival (queueing included)."""
        return self.token_times[0] - self.arrival_s

    @property
    def tpot(self) -> float:
        """Time per output token after the first: (last - first) / (n - 1); 0 for one token."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else 0.0

    @property
    def latency(self) -> float:
        """End to end: last output token - arrival."""
        return self.token_times[-1] - self.arrival_s

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
