"""Tensor parallelism on the CPU (gloo, two processes): TP = 2 gives TP = 1's greedy tokens through the engine."""
import random

import pytest
import torch
import torch.nn as nn

import labkit  # noqa: F401
from labkit.config import LlamaConfig
from labkit.tensor_parallel import check_divisible, generate_tensor_parallel

pytestmark = pytest.mark.timeout(400)


def workload():
    rng = random.Random(0)
    system = [rng.randrange(4096) for _ in range(40)]
    reqs = []
    for i in range(6):
        prompt = (system if i % 2 else []) + [rng.randrange(4096) for _ in range(rng.randrange(3, 30))]
        reqs.append((prompt, dict(max_tokens=16, ignore_eos=True)))
    return reqs


def test_tp2_equals_tp1_through_the_engine_with_prefix_caching_and_preemption():
    # a pool too small for all six requests at once (preemption), and a shared system prompt (prefix hits)
    args = dict(num_blocks=24, block_size=8, max_num_batched_tokens=32, enable_prefix_caching=True,
                preemption="recompute", watermark=0.0)
    reqs = workload()
    (one,) = generate_tensor_parallel(reqs, 1, args)
    two = generate_tensor_parallel(reqs, 2, args)
    assert one["preemptions"] > 0 and one["cached_tokens"] > 0
    assert two[0]["tokens"] == two[1]["tokens"] == one["tokens"]
    assert all(r["pool_whole"] for r in two)
    assert two[0]["kv_heads_per_rank"] * 2 == one["kv_heads_per_rank"]
    assert two[0]["kv_bytes_per_rank"] * 2 == one["kv_bytes_per_rank"]
    assert two[0]["weight_bytes_per_rank"] < 0.6 * one["weight_bytes_per_rank"]


def test_sizes_that_do_not_split_are_refused():
    with pytest.raises(ValueError, match="num_key_value_heads=4 is not divisible by tensor_parallel_size=3"):
        check_divisible(LlamaConfig(num_attention_heads=12, num_key_value_heads=4, hidden_size=384,
                                    intermediate_size=768, vocab_size=3072), 3)


def test_row_and_column_shards_reassemble_the_linear():
    """The split itself, without processes: column shards concatenate, row shards sum, to the full linear."""
    torch.manual_seed(0)
    full = nn.Linear(8, 6)
    x = torch.randn(3, 8)
    cols = [full.weight[r * 3:(r + 1) * 3] for r in range(2)]
    assert torch.allclose(torch.cat([x @ w.T for w in cols], -1) + full.bias, full(x), atol=1e-6)
    rows = [full.weight[:, r * 4:(r + 1) * 4] for r in range(2)]
    assert torch.allclose(sum(x[:, r * 4:(r + 1) * 4] @ w.T for r, w in enumerate(rows)) + full.bias, full(x),
                          atol=1e-6)
