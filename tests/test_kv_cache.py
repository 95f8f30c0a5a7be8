"""The contiguous KV cache changes the cost of generation, never its result."""
import pytest
import torch

from labkit.config import LlamaConfig
from labkit.generate import generate, sample_next
from labkit.kv_cache import ContiguousCache
from labkit.checkpoint import load_default_model
from labkit.model import LlamaForCausalLM

PROMPTS = ["It is a truth universally acknowledged", "Emma Woodhouse, handsome, clever, and rich,",
           "\"My dear Mr. Bennet,\" said his lady to him one day,", "Captain"]


@pytest.fixture(scope="module")
def shipped():
    return load_default_model()


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("new_tokens", [1, 17, 60])
def test_greedy_tokens_equal_without_and_with_cache(shipped, prompt, new_tokens):
    model, tok = shipped
    ids = tok.encode(prompt)
    plain = generate(model, ids, new_tokens).token_ids
    cached = generate(model, ids, new_tokens, cache=ContiguousCache(model.config, 1, len(ids) + new_tokens)).token_ids
    assert cached == plain and len(plain) == new_tokens


def test_seeded_sampling_is_repeatable_and_cache_independent(shipped):
    model, tok = shipped
    ids = tok.encode(PROMPTS[0])
    a = generate(model, ids, 25, temperature=0.9, top_k=50, top_p=0.9, seed=3).token_ids
    b = generate(model, ids, 25, temperature=0.9, top_k=50, top_p=0.9, seed=3,
                 cache=ContiguousCache(model.config, 1, 64)).token_ids
    assert a == b


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    picks = {sample_next(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(s)) for s in range(200)}
    assert picks == {0, 1}


TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def test_ragged_rows_through_a_view_match_single_sequences():
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).eval()
    a, b = [3, 9, 4, 1, 7], [5, 2]
    alone = [generate(model, p, 6).token_ids for p in (a, b)]
    cache = ContiguousCache(TINY, batch_size=4, max_len=16)
    seqs = {2: list(a), 0: list(b)}  # rows 2 and 0 of the cache
    with torch.no_grad():
        for row, toks in seqs.items():  # prefill each row on its own
            logits = model(torch.tensor([toks]), cache=cache.view([row]))
            toks.append(int(logits[0, -1].argmax()))
        for _ in range(5):  # decode both rows in one batch, each at its own position
            rows = list(seqs)
            ids = torch.tensor([[seqs[r][-1]] for r in rows])
            pos = torch.tensor([[len(seqs[r]) - 1] for r in rows])
            logits = model(ids, pos, cache=cache.view(rows))
            for i, r in enumerate(rows):
                seqs[r].append(int(logits[i, -1].argmax()))
    assert seqs[2][len(a):] == alone[0] and seqs[0][len(b):] == alone[1]


def test_position_past_the_reservation_is_refused_and_nothing_written():
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).eval()
    cache = ContiguousCache(TINY, batch_size=1, max_len=8)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5, 6]]), cache=cache)
        before = cache.k.clone(), cache.v.clone(), cache.seq_lens.clone()
        with pytest.raises(ValueError, match="max_len=8"):
            model(torch.tensor([[7, 8, 9]]), torch.tensor([[6, 7, 8]]), cache=cache)
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1]) and torch.equal(cache.seq_lens, before[2])


def test_generation_longer_than_the_context_is_refused():
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).eval()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, [1] * 30, 5)
