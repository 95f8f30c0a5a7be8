"""A Llama-family decoder, written out so every line can be read next to the notebooks.

    tokens -> embed -> [ RMSNorm -> attention (RoPE, GQA, through a KV cache) -> + ->
                         RMSNorm -> SwiGLU MLP -> + ] x num_hidden_layers -> RMSNorm -> lm_head -> logits

(Mixtral: the MLP is a sparse mixture of SwiGLU experts, ``block_sparse_moe``; see :mod:`labkit.moe`.)

Module and parameter names follow Hugging Face's (``model.layers.0.self_attn.q_proj.weight``), so
a checkpoint's safetensors load without renaming and quantised linears can be swapped in by name.
Loading is in :mod:`labkit.checkpoint`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from labkit.config import LlamaConfig
from labkit.kv_cache import KVCache, NoCache
from labkit.moe import SparseMoeBlock


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()  # normalise in fp32, as HF does, whatever the model dtype
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    """Rotation frequency of each dimension pair, with the checkpoint's scaling applied: (head_dim // 2,)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq.float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, D) each


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        qkv_bias = c.attention_bias or c.qkv_bias
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x, cos, sin, positions, cache: KVCache, layer_idx: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = cache.attend(layer_idx, q, k, v, positions)  # (B, Hq, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.num_local_experts > 0
        if self.is_moe:
            self.block_sparse_moe = SparseMoeBlock(config)  # HF Mixtral's name, so checkpoints load as they are
        else:
            self.mlp = MLP(config)

    def forward(self, x, cos, sin, positions, cache, layer_idx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, layer_idx)
        ffn = self.block_sparse_moe if self.is_moe else self.mlp
        return x + ffn(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


def checked_positions(config: LlamaConfig, input_ids: torch.Tensor, positions: torch.Tensor | None,
                      validate: bool) -> torch.Tensor:
    """The forward's input contract: input_ids (B, T); positions default to 0..T-1 and (with ``validate``, a
    host sync) must stay inside the model's context. Returns the positions (B, T)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if positions is None:
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
    if validate and int(positions.max()) >= config.max_position_embeddings:
        raise ValueError(
            f"position {int(positions.max())} is beyond the model's context of "
            f"{config.max_position_embeddings} tokens; shorten the prompt or the generation."
        )
    return positions


class LlamaForCausalLM(nn.Module):
    """forward(input_ids (B, T), positions (B, T) or None, cache or None) -> logits (B, T, vocab)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_indices: torch.Tensor | None = None,
                validate: bool = True) -> torch.Tensor:
        """``logits_indices``: token positions (along T) whose logits are wanted; the LM head runs on those
        rows only (the engine's last token of each sequence). ``validate=False`` skips the context check,
        which reads ``positions`` back to the host (a sync the engine, having checked lengths, avoids)."""
        positions = checked_positions(self.config, input_ids, positions, validate)
        cache = NoCache() if cache is None else cache
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, positions, cache, i)
        if logits_indices is not None:
            h = h[:, logits_indices]  # (B, K, hidden)
        return self.lm_head(self.model.norm(h))

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

