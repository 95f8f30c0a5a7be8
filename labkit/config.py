"""The model's hyper-parameters, read from (and written to) a Hugging Face ``config.json``.

One dataclass covers the Llama family the lab runs: Llama 2/3 (GQA, llama3 RoPE scaling), SmolLM,
TinyLlama, Qwen2 (q/k/v bias) and Mixtral (``num_local_experts`` > 0: a sparse mixture of SwiGLU experts
in place of the MLP, :mod:`labkit.moe`). RoPE settings are read both as older checkpoints write them
(``rope_theta`` + ``rope_scaling``) and as transformers 5 writes them (``rope_parameters``).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Llama: bias on q, k, v and o
    qkv_bias: bool = False  # Qwen2: bias on q, k, v only
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_local_experts: int = 0  # Mixtral: experts per MoE layer (0: a dense MLP); intermediate_size is one expert's
    num_experts_per_tok: int = 2  # Mixtral: top-k experts each token is routed to

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}): each KV head serves a whole group of query heads."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unknown model_type {self.model_type!r}; labkit runs {sorted(SUPPORTED_ARCHITECTURES)}")
        if (self.model_type == "mixtral") != (self.num_local_experts > 0):
            raise ValueError(f"num_local_experts={self.num_local_experts} with model_type {self.model_type!r}: "
                             f"experts (num_local_experts > 0) go with model_type 'mixtral', and only with it")
        if self.num_local_experts and not 0 < self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..num_local_experts ({self.num_local_experts}), "
                             f"got {self.num_experts_per_tok}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"RoPE type {rope_type!r} is not supported; labkit supports {SUPPORTED_ROPE_TYPES}")

    # --- sizes the notebooks talk about -------------------------------------------------------
    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V, every layer, every KV head: what one cached token costs."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    # --- Hugging Face config.json -------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: model_type {model_type!r} (architectures {archs}) is not a Llama-family model labkit "
                f"can run; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        rope_theta, rope_scaling = _read_rope(d, source)
        if model_type == "mixtral" and (d.get("sliding_window") or 0) and d["sliding_window"] < d.get(
                "max_position_embeddings", 2048):
            raise ValueError(f"{source}: sliding_window {d['sliding_window']} is not supported by labkit's attention; "
                             f"set it to null to run the model with full attention")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)) if model_type == "llama" else False,
            qkv_bias=model_type == "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            num_local_experts=d.get("num_local_experts", 0) if model_type == "mixtral" else 0,
            num_experts_per_tok=d.get("num_experts_per_tok", 2),
        )

    @classmethod
    def from_file(cls, path: str | pathlib.Path) -> "LlamaConfig":
        path = pathlib.Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no config.json; a model directory needs config.json + *.safetensors")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_hf_dict(d, str(path))

    def to_hf_dict(self) -> dict:
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        d = {
            "architectures": [SUPPORTED_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,  # older readers
            "rope_parameters": rope_parameters,  # transformers 5
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        if self.model_type == "mixtral":
            d.update(num_local_experts=self.num_local_experts, num_experts_per_tok=self.num_experts_per_tok,
                     sliding_window=None)
        if self.rope_scaling:
            d["rope_scaling"] = dict(self.rope_scaling)
        return d


def _read_rope(d: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either config layout."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = dict(d["rope_scaling"]) if d.get("rope_scaling") else {}
    if "type" in scaling and "rope_type" not in scaling:  # very old spelling
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    if scaling.get("rope_type", "default") == "default":
        return float(theta), None
    rope_type = scaling["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: RoPE type {rope_type!r} is not supported; labkit supports {SUPPORTED_ROPE_TYPES}")
    need = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor",
                                             "original_max_position_embeddings"]}[rope_type]
    missing = [k for k in need if k not in scaling]
    if missing:
        raise ValueError(f"{source}: RoPE scaling {rope_type!r} is missing {missing}")
    return float(theta), scaling
