"""Notebook 02 exercises: what a cached token costs, and what a contiguous reservation wastes."""
import torch

from labkit.config import LlamaConfig
from labkit.exercises import Exercise
from labkit.fragmentation import reservation_waste


def _int(gen, lo, hi):
    return int(torch.randint(lo, hi, (1,), generator=gen))


def _random_config(gen) -> LlamaConfig:
    kv_heads = [1, 2, 4, 8][_int(gen, 0, 4)]
    heads = kv_heads * [1, 2, 4, 8][_int(gen, 0, 4)]
    head_dim = [32, 64, 80, 128, 256][_int(gen, 0, 5)]
    return LlamaConfig(vocab_size=1000, hidden_size=heads * head_dim, intermediate_size=4 * heads * head_dim,
                       num_hidden_layers=_int(gen, 1, 81), num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim)


def _kv_bytes_per_token(config: LlamaConfig, dtype_bytes: int) -> int:
    return config.kv_bytes_per_token(dtype_bytes)


def _waste_inputs(gen):
    prompt, output = _int(gen, 1, 500), _int(gen, 1, 800)
    return prompt, output, prompt + output - 1 + _int(gen, 0, 1500)


EXERCISES = {
    "kv_bytes_per_token": Exercise(
        reference=_kv_bytes_per_token,
        make_inputs=lambda g: (_random_config(g), [1, 2, 4][_int(g, 0, 3)]),
        spec="bytes of K and V one cached token takes, summed over every layer and KV head, "
             "for values of dtype_bytes bytes each.",
        hints=("Count the numbers one token adds to the cache in one layer: a key and a value vector per KV head.",
               "Query heads share KV heads (GQA), so use config.num_key_value_heads, not num_attention_heads.",
               "2 (K and V) x layers x KV heads x head_dim x dtype_bytes.")),
    "reservation_waste": Exercise(
        reference=reservation_waste, make_inputs=_waste_inputs,
        spec="slot-steps a contiguous reservation of `reserved` slots holds but leaves empty while a request "
             "with prompt_len prompt tokens generates output_len tokens (its K/V fill prompt_len + k slots "
             "at its k-th step, k = 0 .. output_len - 1: the last token is returned, never fed back).",
        hints=("At step k its K/V fill prompt_len + k slots; the empty slots are reserved minus that.",
               "Sum the empty slots over the output_len steps (a loop is fine; a closed form exists too).")),
}
