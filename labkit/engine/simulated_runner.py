"""A runner with no model: each step takes what the recorded GPU cost model predicts.

It lets the engine's real scheduler and block manager play traces far larger than a CPU could run
(notebooks 03, 04 and 07). Tokens are stand-ins; a request runs to its ``max_tokens`` (use
``SamplingParams(ignore_eos=True)``). Time per step is :class:`labkit.step_cost.StepCostModel`'s, plus the
bytes swapped over ``swap_bytes_per_s``.
"""
from __future__ import annotations

from labkit.engine.scheduler import SchedulerOutput
from labkit.step_cost import StepCostModel


class SimulatedRunner:
    def __init__(self, cost: StepCostModel, vocab_size: int, bytes_per_block: int = 0,
                 swap_bytes_per_s: float | None = None):
        if swap_bytes_per_s is not None and swap_bytes_per_s <= 0:
            raise ValueError(f"swap_bytes_per_s must be positive, got {swap_bytes_per_s}")
        self.cost, self.vocab_size = cost, vocab_size
        self.bytes_per_block, self.swap_bytes_per_s = bytes_per_block, swap_bytes_per_s
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
        return {s.seq.seq_id: (s.seq.seq_id * 7919 + s.seq.num_tokens) % self.vocab_size
                for s in out.scheduled if s.samples}



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
