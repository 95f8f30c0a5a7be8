"""PagedCache gives the model the same attention as ContiguousCache: same greedy tokens, same outputs.

The decode path runs kernels/paged_attention.py (in Triton's interpreter on the CPU), so the model is
tiny: 2 layers, 4 query / 2 KV heads of head_dim 16.
"""
from __future__ import annotations

import pytest
import torch

import labkit
from labkit.config import LlamaConfig
from labkit.generate import generate
from labkit.kv_cache import ContiguousCache, NoCache
from labkit.model import LlamaForCausalLM
from labkit.paged_cache import PagedCache

DEVICE = labkit.DEVICE
CONFIG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).to(DEVICE).eval()


def scrambled(cache: PagedCache, seed: int = 0) -> PagedCache:
    """Take and free every block in a random order, so new sequences get non-contiguous, shuffled blocks."""
    alloc = cache.block_manager.allocator
    taken = [alloc.allocate() for _ in range(alloc.num_blocks)]
    for i in torch.randperm(len(taken), generator=torch.Generator().manual_seed(seed)).tolist():
        alloc.free(taken[i])
    return cache


def test_greedy_tokens_match_contiguous_cache(model):
    prompt = torch.randint(CONFIG.vocab_size, (7,), generator=torch.Generator().manual_seed(1)).tolist()
    n_new = 12  # 19 tokens: blocks of 4 fill up and new ones are appended mid-generation
    paged = scrambled(PagedCache(CONFIG, num_blocks=12, block_size=4, device=DEVICE, backend="triton"))
    got = generate(model, prompt, n_new, cache=paged).token_ids
    want = generate(model, prompt, n_new, cache=ContiguousCache(CONFIG, 1, device=DEVICE)).token_ids
    assert got == want
    assert got == generate(model, prompt, n_new, cache=NoCache()).token_ids
    table = paged.block_manager.block_table(0)
    assert len(table) == 5 and table != sorted(table), "the test should run on shuffled blocks"


def test_batched_ragged_decode_matches_contiguous_cache(model):
    """Two rows with different prompt lengths, prefilled one at a time, then decoded together."""
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(CONFIG.vocab_size, (1, n), generator=gen).to(DEVICE) for n in (3, 10)]
    paged = scrambled(PagedCache(CONFIG, num_blocks=10, block_size=4, device=DEVICE, backend="triton"), seed=1)
    contiguous = ContiguousCache(CONFIG, 2, max_len=32, device=DEVICE)
    last = []
    for row, ids in enumerate(prompts):
        pos = torch.arange(ids.shape[1], device=DEVICE)[None]
        want = model(ids, pos, cache=contiguous.view([row]))
        got = model(ids, pos, cache=paged.view([row]))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        last.append(int(want[0, -1].argmax()))
    lengths = [p.shape[1] for p in prompts]
    for _ in range(3):
        ids = torch.tensor(last, device=DEVICE)[:, None]  # (2, 1)
        pos = torch.tensor(lengths, device=DEVICE)[:, None]
        want = model(ids, pos, cache=contiguous)
        got = model(ids, pos, cache=paged)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        last = want[:, -1].argmax(-1).tolist()
        lengths = [n + 1 for n in lengths]
    assert paged.block_manager.num_tokens(0) == 6 and paged.block_manager.num_tokens(1) == 13


def test_positions_must_continue_the_sequence(model):
    cache = PagedCache(CONFIG, num_blocks=4, block_size=4, device=DEVICE, backend="torch")
    model(torch.tensor([[1, 2, 3]], device=DEVICE), cache=cache)
    with pytest.raises(ValueError, match="positions must continue"):
        model(torch.tensor([[4]], device=DEVICE), torch.tensor([[5]], device=DEVICE), cache=cache)


def test_bad_backend_and_head_dim():
    with pytest.raises(ValueError, match="backend must be"):
        PagedCache(CONFIG, num_blocks=4, backend="cuda")
    odd = LlamaConfig(vocab_size=8, hidden_size=24, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)  # head_dim 12
    with pytest.raises(ValueError, match="power of two"):
        PagedCache(odd, num_blocks=4, backend="triton")
