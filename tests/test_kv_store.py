"""The engine's paged KV store (what PagedCache's tests covered): the Triton decode path over shuffled,
non-contiguous blocks reads what the plain-torch path reads, and bad shapes are refused up front."""
from __future__ import annotations

import pytest
import torch

import labkit
from labkit.config import LlamaConfig
from labkit.engine.kv_store import AttentionMetadata, PagedKVStore
from labkit.engine.kv_store_quant import QuantizedKVStore
from labkit.model import LlamaForCausalLM

DEVICE = labkit.DEVICE
CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small models: one thread is fastest, and on a shared machine more threads only make it slower."""
    from labkit.side_channel import one_thread

    with one_thread():
        yield


@pytest.mark.timeout(120)
def test_kernel_decode_over_shuffled_blocks_matches_no_cache():
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).to(DEVICE).eval()
    ids = torch.randint(0, 97, (2, 11))
    tables = [[5, 0, 9], [2, 7, 3]]  # shuffled physical blocks of 4 slots; 11 tokens + 1 decode fit in 3
    stores = {k: PagedKVStore(CONFIG, 10, 4, device=DEVICE, use_kernels=k) for k in (False, True)}
    with torch.no_grad():
        want = model(ids.to(DEVICE))[:, -1]
        slots = [t[p // 4] * 4 + p % 4 for t in tables for p in range(10)]
        stores[False].metadata = AttentionMetadata.build([10, 10], [10, 10], tables, slots, DEVICE, with_torch_path=True)
        pos = torch.arange(10).repeat(2)[None].to(DEVICE)
        model(ids[:, :10].reshape(1, -1).to(DEVICE), pos, cache=stores[False], validate=False)  # prefill, torch path
        stores[True].k_cache.copy_(stores[False].k_cache)
        stores[True].v_cache.copy_(stores[False].v_cache)
        for use_kernels, store in stores.items():  # decode: the paged kernel (interpreter on the CPU) vs torch
            store.metadata = AttentionMetadata.build([1, 1], [11, 11], tables, [t[2] * 4 + 2 for t in tables], DEVICE,
                                                     with_torch_path=not use_kernels)
            got = model(ids[:, 10:].reshape(1, -1).to(DEVICE), torch.full((1, 2), 10, device=DEVICE), cache=store,
                        validate=False)[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_stores_refuse_a_head_dim_the_kernels_cannot_take():
    odd = LlamaConfig(vocab_size=8, hidden_size=24, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)  # head_dim 12
    with pytest.raises(ValueError, match="power of two"):
        PagedKVStore(odd, num_blocks=4, block_size=4, use_kernels=True)
    with pytest.raises(ValueError, match="power of two"):
        QuantizedKVStore(odd, num_blocks=4, block_size=4, use_kernels=True)
    QuantizedKVStore(odd, num_blocks=4, block_size=1)  # the torch path takes any head_dim (scales stay aligned)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        PagedKVStore(CONFIG, 4, 4, dtype=torch.int8)
