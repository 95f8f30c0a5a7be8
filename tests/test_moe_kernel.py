"""kernels/moe.py: alignment by expert and the grouped matmul against per-expert loops (in Triton's interpreter on
the CPU; on the GPU the inputs are drawn on the CPU and moved to it)."""
import pytest
import torch

import labkit  # noqa: F401
from kernels.moe import fused_moe, fused_moe_ref, moe_align_block_size
from labkit.config import LlamaConfig
from labkit.moe import SparseMoeBlock, route_token_choice, stacked_weights

DEV = labkit.DEVICE
BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)  # the smallest tl.dot a GPU compiles


def _routing(n, e, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g) * 2
    w, ids = torch.topk(torch.softmax(logits, -1), k, -1)
    return ids, w / w.sum(-1, keepdim=True)


def test_align_groups_every_pair_once_in_one_expert_blocks():
    ids, _ = _routing(37, 6, 2, seed=0)
    ids[ids == 5] = 4  # expert 5 gets nothing: no block, its weights never read
    ids[3, 1] = -1  # a dropped pair: in no block
    sorted_ids, block_expert, counts = moe_align_block_size(ids, 6, 16)
    flat = ids.reshape(-1)
    pairs = sorted_ids[sorted_ids < flat.numel()].long()
    assert sorted(pairs.tolist()) == [p for p in range(flat.numel()) if flat[p] >= 0]
    rows_expert = block_expert.repeat_interleave(16)
    real = sorted_ids < flat.numel()
    assert torch.equal(flat[sorted_ids[real].long()], rows_expert[real].long())  # each block holds one expert
    assert 5 not in block_expert.tolist()
    assert torch.equal(counts, torch.bincount(flat[flat >= 0], minlength=6))


@pytest.mark.parametrize("n,e,k,h,i", [(1, 4, 2, 32, 48), (23, 4, 2, 32, 48), (40, 8, 2, 48, 32), (9, 3, 3, 40, 24)])
def test_fused_moe_matches_loop(n, e, k, h, i):
    g = torch.Generator().manual_seed(n + e)
    x = torch.randn(n, h, generator=g)
    w13 = torch.randn(e, 2 * i, h, generator=g) / h**0.5
    w2 = torch.randn(e, h, i, generator=g) / i**0.5
    ids, weights = _routing(n, e, k, seed=n)
    if n > 5:
        ids[2, 0] = -1  # a dropped pair contributes nothing
    ref = fused_moe_ref(x.double(), w13.double(), w2.double(), ids, weights.double())
    got = fused_moe(x.to(DEV), w13.to(DEV), w2.to(DEV), ids.to(DEV), weights.to(DEV), blocks=BLOCKS)
    assert (got.cpu().double() - ref).abs().max().item() < 1e-4


def test_fused_moe_equals_the_model_block():
    """The kernel computes what labkit.moe.SparseMoeBlock computes (Mixtral's routing, HF's numerics)."""
    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    block = SparseMoeBlock(cfg)
    x = torch.randn(19, 32)
    d = route_token_choice(block.gate(x), 2)
    w, ids = torch.topk(d.combine, 2, -1)
    w13, w2 = stacked_weights(block)
    with torch.no_grad():
        got = fused_moe(x.to(DEV), w13.to(DEV), w2.to(DEV), ids.to(DEV), w.to(DEV), blocks=BLOCKS)
        assert (got.cpu() - block(x)).abs().max().item() < 1e-5


def test_wrapper_errors_name_the_shapes():
    x, w13, w2 = torch.randn(4, 32), torch.randn(2, 96, 32), torch.randn(2, 32, 40)
    ids, w = _routing(4, 2, 1, 0)
    with pytest.raises(ValueError, match="w2"):
        fused_moe(x, w13, w2, ids, w)
    with pytest.raises(ValueError, match="experts"):
        moe_align_block_size(ids + 5, 2, 16)


def test_experts_touched_formula_matches_sampling():
    from labkit.moe_amortisation import expected_experts_touched, measured_experts_touched

    for b in (1, 2, 4, 8, 16):
        sampled = measured_experts_touched(b, 8, 2, trials=2000, seed=b)
        assert abs(sampled - expected_experts_touched(b, 8, 2)) < 0.06, b
    assert expected_experts_touched(1, 128, 8) == 8 and expected_experts_touched(0, 8, 2) == 0
