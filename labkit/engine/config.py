"""The engine's knobs in one validated dataclass, named as vLLM names them where vLLM has the knob.

    batching       "continuous" (Orca: admit/retire every step) | "static" (a batch forms only when the
                   engine is empty and ends with its last request) | "one-at-a-time" (max_num_seqs = 1)
    allocation     "paged" (blocks on demand, vLLM) | "contiguous" (one run of consecutive blocks reserved up
                   front, placed first fit, HF / FasterTransformer / Orca style: a running request never runs
                   out of room; with block_size=1 the reservation is token-slot granular)
    reserve        contiguous only, how much it reserves: "max_new_tokens" (prompt + max_tokens) | "max_len"
                   (the whole context, whatever the request) | "oracle" (prompt + the output it will really
                   produce: only a replay of a known trace can, see EngineBlockManager.oracle)
    preemption     "recompute" | "swap" | "none" (a step that cannot get a block raises instead)
    chunked prefill  a prompt is fed in chunks under ``max_num_batched_tokens`` per step, beside the decodes
    batch_invariant  every reduction in a fixed order whatever the batch (labkit.batch_invariant): a request's
                   logits are bitwise the same alone or batched, chunked or not, at some cost in speed
    fused_ops      fuse the model in place at construction (labkit.fused_ops): qkv / gate_up projections
                   concatenated, RMSNorm + residual, SiLU * up and RoPE one kernel each: fewer launches a step

Earlier notebooks are restricted configurations of the same engine (see :meth:`EngineConfig.preset`).
"""
from __future__ import annotations

import dataclasses

BATCHING = ("continuous", "static", "one-at-a-time")
ALLOCATION = ("paged", "contiguous")
RESERVE = ("max_new_tokens", "max_len", "oracle")
PREEMPTION = ("recompute", "swap", "none")
KV_CACHE_DTYPES = ("auto", "int8", "fp8")


@dataclasses.dataclass
class EngineConfig:
    num_blocks: int = 256  # device KV pool, in blocks of block_size tokens
    block_size: int = 16
    max_num_seqs: int = 32  # sequences in one step (batch slots)
    max_num_batched_tokens: int = 2048  # tokens fed to the model in one step (prefill chunks + decodes)
    max_model_len: int | None = None  # default: the model's context
    batching: str = "continuous"
    allocation: str = "paged"
    reserve: str = "max_new_tokens"  # contiguous only: see the module docstring
    preemption: str = "recompute"
    num_cpu_blocks: int = 0  # swap space (preemption="swap")
    watermark: float = 0.01  # share of blocks admission keeps free while anything runs
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool = True
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype; "int8" / "fp8": quantised K/V with scales
    enforce_eager: bool = False  # True: no CUDA graphs for decode
    attention_backend: str = "auto"  # "auto": Triton kernels on a GPU, plain torch on the CPU; "triton"; "torch"
    batch_invariant: bool = False  # True: labkit.batch_invariant's ops and attention for every step
    fused_ops: bool = False  # True: labkit.fused_ops.fuse_model(model) at construction (the model is changed)

    def __post_init__(self):
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {v!r}")
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"EngineConfig.block_size must be a power of two, got {self.block_size}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"EngineConfig.max_model_len must be an integer >= 1 or None, got {self.max_model_len!r}")
        if not isinstance(self.num_cpu_blocks, int) or self.num_cpu_blocks < 0:
            raise ValueError(f"EngineConfig.num_cpu_blocks must be an integer >= 0, got {self.num_cpu_blocks!r}")
        if not 0 <= self.watermark < 1:
            raise ValueError(f"EngineConfig.watermark must be in [0, 1), got {self.watermark!r}")
        for name, allowed in (("batching", BATCHING), ("allocation", ALLOCATION), ("reserve", RESERVE),
                              ("preemption", PREEMPTION),
                              ("kv_cache_dtype", KV_CACHE_DTYPES),
                              ("attention_backend", ("auto", "triton", "torch"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"EngineConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"EngineConfig.batch_invariant must be True or False, got {self.batch_invariant!r}")
        if not isinstance(self.fused_ops, bool):
            raise ValueError(f"EngineConfig.fused_ops must be True or False, got {self.fused_ops!r}")
        if self.batch_invariant and self.fused_ops:
            raise ValueError("batch_invariant=True swaps the unfused modules' forwards and has no fused kernels; "
                             "set fused_ops=False with it")
        if self.batch_invariant and self.kv_cache_dtype != "auto":
            raise ValueError("batch_invariant=True has no quantised-KV attention; use kv_cache_dtype='auto'")
        if self.batching == "one-at-a-time":
            self.max_num_seqs = 1
        if self.preemption == "swap" and self.num_cpu_blocks == 0:
            raise ValueError("preemption='swap' needs swap space: set num_cpu_blocks (e.g. equal to num_blocks)")
        if self.allocation == "contiguous" and self.enable_prefix_caching:
            raise ValueError("prefix caching shares paged blocks; it needs allocation='paged'")
        if self.allocation == "paged" and self.reserve != "max_new_tokens":
            raise ValueError(f"reserve={self.reserve!r} is a policy of the contiguous allocator; a paged pool reserves "
                             "nothing. Use allocation='contiguous' or drop reserve.")

    @property
    def watermark_blocks(self) -> int:
        return int(self.watermark * self.num_blocks)

    @classmethod
    def preset(cls, name: str, **overrides) -> "EngineConfig":
        """The restricted configurations earlier notebooks teach, as one engine:

        ``"hf_static"`` (03: contiguous reservation, static batches), ``"orca"`` (03: contiguous,
        continuous), ``"paged"`` (04: paged + recompute), ``"prefix"`` (06: + prefix caching),
        ``"swap"`` (07: paged + swap), ``"full"`` (11: everything on).
        """
        presets = {
            "hf_static": dict(allocation="contiguous", batching="static", preemption="none",
                              enable_chunked_prefill=False, watermark=0.0),
            "orca": dict(allocation="contiguous", batching="continuous", preemption="none",
                         enable_chunked_prefill=False, watermark=0.0),
            "paged": dict(allocation="paged", preemption="recompute"),
            "prefix": dict(allocation="paged", preemption="recompute", enable_prefix_caching=True),
            "swap": dict(allocation="paged", preemption="swap"),
            "full": dict(allocation="paged", preemption="recompute", enable_prefix_caching=True,
                         enable_chunked_prefill=True),
        }
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        fields = {**presets[name], **overrides}
        if fields.get("preemption") == "swap" and "num_cpu_blocks" not in fields:
            fields["num_cpu_blocks"] = fields.get("num_blocks", cls.num_blocks)
        return cls(**fields)
