"""A runner with no model: each step takes what the recorded GPU cost model predicts.

It lets the engine's real scheduler and block manager play traces far larger than a CPU could run
(notebooks 02, 03, 04 and 07). Tokens are stand-ins. A request runs to its ``max_tokens`` (use
``SamplingParams(ignore_eos=True)``), or, given ``output_lens={request_id: n}``, ends with
``eos_token_id`` as its n-th token, the way a model stops before the client's cap: a trace's true output
length, under a ``max_tokens`` that is only the client's limit. Time per step is
:class:`labkit.step_cost.StepCostModel`'s, plus the bytes swapped over ``swap_bytes_per_s``.
"""
from __future__ import annotations

from labkit.engine.scheduler import SchedulerOutput
from labkit.step_cost import StepCostModel


class SimulatedRunner:
    def __init__(self, cost: StepCostModel, vocab_size: int, bytes_per_block: int = 0,
                 swap_bytes_per_s: float | None = None, output_lens: dict | None = None,
                 eos_token_id: int | None = None):
        if swap_bytes_per_s is not None and swap_bytes_per_s <= 0:
            raise ValueError(f"swap_bytes_per_s must be positive, got {swap_bytes_per_s}")
        if output_lens and eos_token_id is None:
            raise ValueError("output_lens ends requests with an EOS token: give eos_token_id (and the same id to "
                             "LLMEngine(eos_token_ids=...))")
        if output_lens and any(int(n) < 1 for n in output_lens.values()):
            raise ValueError("every output length in output_lens must be >= 1")
        self.cost, self.vocab_size = cost, vocab_size
        self.bytes_per_block, self.swap_bytes_per_s = bytes_per_block, swap_bytes_per_s
        self.output_lens = dict(output_lens or {})
        self.eos_token_id = eos_token_id
        self.last_step_seconds = 0.0

    def execute(self, out: SchedulerOutput) -> dict[int, int]:
        prefill = [s.num_new_tokens for s in out.scheduled if s.num_new_tokens > 1 or not s.samples]
        decode = [s.seq.num_computed_tokens + 1 for s in out.scheduled if s.num_new_tokens == 1 and s.samples]
        seconds = self.cost.step_seconds(prefill, decode)
        moved = len(out.swap_out) + len(out.swap_in)
        if moved:
            if self.swap_bytes_per_s is None:
                raise ValueError("this trace swaps: give SimulatedRunner swap_bytes_per_s (host<->device bandwidth)")
            seconds += moved * self.bytes_per_block / self.swap_bytes_per_s
        self.last_step_seconds = seconds
        return {s.seq.seq_id: self._token(s.seq) for s in out.scheduled if s.samples}

    def _token(self, seq) -> int:
        """The stand-in next token: EOS when the request reaches its output length, else never EOS."""
        target = self.output_lens.get(seq.seq_id)
        if target is not None and seq.num_output_tokens + 1 >= target:
            return self.eos_token_id
        token = (seq.seq_id * 7919 + seq.num_tokens) % self.vocab_size
        return (token + 1) % self.vocab_size if token == self.eos_token_id else token


def recorded_gpu_runner(block_size: int, swap_bytes_per_s: float | None = None, data: dict | None = None):
    """``(runner, model_config)`` for the recorded roofline (``data/bench/roofline.json``): a SimulatedRunner on
    the cost model of the shape it was measured on (Llama-3-8B layers on an H200, bf16), and that shape as a
    LlamaConfig for ``LLMEngine(runner=..., model_config=...)``. A swapped block moves that shape's bf16 K/V of
    every layer: ``kv_bytes_per_token(2) * block_size`` bytes."""
    from labkit.bench import load
    from labkit.config import LlamaConfig

    data = load("roofline") if data is None else data
    s = data["shapes"]
    config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                         intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_hidden_layers"],
                         num_attention_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
                         head_dim=s["head_dim"], max_position_embeddings=8192)
    runner = SimulatedRunner(StepCostModel.from_roofline(data), config.vocab_size,
                             bytes_per_block=config.kv_bytes_per_token(2) * block_size, swap_bytes_per_s=swap_bytes_per_s)
    return runner, config
