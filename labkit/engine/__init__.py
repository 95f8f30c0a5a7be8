"""labkit's serving engine: vLLM's shape, nano-vllm's size, the lab's lessons.

    requests -> Scheduler (policies, EngineBlockManager) -> ModelRunner (PagedKVStore, CUDA graphs) -> kernels

``LLMEngine`` (add_request / step / abort / run) and ``LLM.generate``; ``EngineConfig`` holds every knob,
``EngineConfig.preset`` the restricted configurations of the earlier notebooks.
"""
from labkit.engine.config import EngineConfig
from labkit.engine.llm_engine import LLM, LLMEngine, RequestOutput, StepRecord
from labkit.engine.sequence import FinishReason, Sequence, SequenceStatus
from labkit.engine.simulated_runner import SimulatedRunner
from labkit.sampling import SamplingParams

__all__ = ["EngineConfig", "LLM", "LLMEngine", "RequestOutput", "StepRecord", "Sequence", "SequenceStatus",
           "FinishReason", "SimulatedRunner", "SamplingParams"]
