"""Notebook 09 exercises: a token's KV scale, int8 codes, bytes per token with scales, scores from codes."""
import torch

from kernels.paged_attention_int8kv import quantise_kv_ref
from labkit.config import LlamaConfig
from labkit.exercises import Exercise
from labkit.kv_quant import kv_bytes_per_token


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _token_kv(gen):
    """One token's keys: (num_kv_heads, head_dim), each head at its own magnitude, sometimes an outlier."""
    heads, dim = [1, 2, 4, 8][_int(gen, 0, 4)], [16, 32, 64, 128][_int(gen, 0, 4)]
    x = torch.randn(heads, dim, generator=gen) * torch.rand(heads, 1, generator=gen) * 4
    x[:, _int(gen, 0, dim)] *= 10
    return (x,)


def _random_config(gen) -> LlamaConfig:
    kv_heads = [1, 2, 4, 8][_int(gen, 0, 4)]
    heads = kv_heads * [1, 2, 4][_int(gen, 0, 3)]
    head_dim = [32, 64, 128][_int(gen, 0, 3)]
    return LlamaConfig(vocab_size=1000, hidden_size=heads * head_dim, intermediate_size=4 * heads * head_dim,
                       num_hidden_layers=_int(gen, 1, 81), num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim)


def _scores_inputs(gen):
    t, d = _int(gen, 1, 40), [16, 32, 64][_int(gen, 0, 3)]
    codes, scale = quantise_kv_ref(torch.randn(t, d, generator=gen) * 3, "int8")
    return torch.randn(d, generator=gen), codes, scale


def _scores_ref(q, k_codes, k_scale):
    return (k_codes.float() * k_scale[:, None]) @ q  # dequantise every key, then dot


EXERCISES = {
    "kv_scale": Exercise(
        reference=lambda x: quantise_kv_ref(x, "int8")[1], make_inputs=_token_kv, compare="allclose",
        atol=0.0, rtol=1e-6,
        spec="x: one token's keys (num_kv_heads, head_dim). Return the int8 scale of each KV head, "
             "max |x| over head_dim divided by 127: shape (num_kv_heads,)."),
    "quantise_int8": Exercise(
        reference=lambda x: quantise_kv_ref(x, "int8"), make_inputs=_token_kv,
        spec="x (num_kv_heads, head_dim) -> (codes int8, scale fp32 (num_kv_heads,)): codes = round(x / scale) "
             "with each head's own scale (max|x| / 127)."),
    "int8_kv_bytes_per_token": Exercise(
        reference=lambda config: kv_bytes_per_token(config, "int8"), make_inputs=lambda g: (_random_config(g),),
        spec="bytes one cached token costs with int8 K and V (1 byte a value) plus one fp32 scale per KV head, "
             "for K and for V, in every layer."),
    "scores_from_codes": Exercise(
        reference=_scores_ref, make_inputs=_scores_inputs, compare="allclose", atol=1e-4, rtol=1e-4,
        spec="q (D,), k_codes (T, D) int8, k_scale (T,): the attention scores q . k_t of the dequantised keys "
             "(T,), without building the dequantised key matrix (the scale factors out of the dot product)."),
}
