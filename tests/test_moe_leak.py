"""labkit.moe_leak: the capacity tie-break leaks a co-batched victim's tokens; dropless / isolation stop it."""
import pytest
import torch

import labkit  # noqa: F401
from labkit.config import LlamaConfig
from labkit.model import LlamaForCausalLM
from labkit.moe_leak import moe_input, run_attack


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, model_type="mixtral", num_local_experts=4)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.layers[0].block_sparse_moe.gate.weight.normal_(0, 0.2)
    return m


SECRET = [17, 5, 42, 9, 33]


def _candidates(pos, known):
    return [t for t in (3, 60, 21) if t != SECRET[pos]] + [SECRET[pos], 11]  # wrong guesses first


def test_same_prefix_same_length_gives_bitwise_equal_router_inputs(model):
    a = moe_input(model, torch.tensor(SECRET))
    b = moe_input(model, torch.tensor(SECRET[:3] + [0, 0]))
    assert torch.equal(a[:3], b[:3])  # what the tie needs: identical rows, not merely close ones


def test_attack_recovers_the_secret_and_defences_stop_it(model):
    r = run_attack(model, SECRET, "none", candidates=_candidates)
    assert r.recovered == SECRET and all(r.confirmed)  # and no wrong guess was confirmed before the right one
    assert r.queries == 2 * sum(r.guesses_per_token)
    for defence in ("dropless", "isolate_users"):
        assert run_attack(model, SECRET, defence, candidates=_candidates).recovery_rate == 0.0, defence
