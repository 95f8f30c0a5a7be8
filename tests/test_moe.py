"""labkit's Mixtral must compute what transformers' MixtralForCausalLM computes; routing options against loops."""
import json

import pytest
import torch
from safetensors.torch import save_file

import labkit
from labkit.device import INTERPRETER
from labkit.generate import generate
from labkit.kv_cache import ContiguousCache
from labkit.checkpoint import load_pretrained
from labkit.moe import capacity, route_expert_choice, route_token_choice, set_routing

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, num_local_experts=6,
            num_experts_per_tok=2, tie_word_embeddings=False)


def _hf_mixtral(seed=0):
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**BASE)).float().eval()
    with torch.no_grad():  # HF inits norms to ones; the router at std 0.02 would make routing near-uniform
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return model


def _ids(b=2, t=40):
    return torch.randint(0, BASE["vocab_size"], (b, t), generator=torch.Generator().manual_seed(1))


def test_classic_checkpoint_logits_and_greedy_match(tmp_path):
    hf = _hf_mixtral()
    hf.save_pretrained(tmp_path, safe_serialization=True)  # transformers 5 writes block_sparse_moe.experts.N.w1
    ours, _ = load_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    assert (got - ref).abs().max().item() < 1e-4
    prompt = ids[0, :7]
    with torch.no_grad():
        hf_out = hf.generate(prompt[None], max_new_tokens=16, do_sample=False, min_new_tokens=16,
                             pad_token_id=0)[0, 7:].tolist()
    assert generate(ours, prompt, 16).token_ids == hf_out
    assert generate(ours, prompt, 16, cache=ContiguousCache(ours.config, 1, 64)).token_ids == hf_out


def test_fused_checkpoint_layout(tmp_path):
    """transformers 5 holds experts fused (mlp.experts.gate_up_proj); a checkpoint written that way loads too."""
    hf = _hf_mixtral(seed=3)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    ours, _ = load_pretrained(tmp_path)
    ids = _ids(1, 24)
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-4


def _token_choice_loop(logits, k, cf):
    """Plain float64 reference: first choices in batch order, then second choices; each expert has C slots."""
    n, e = logits.shape
    probs = torch.softmax(logits.double(), -1)
    top_w, top_i = torch.topk(probs, k, -1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    cap = capacity(n, k, e, cf) if cf is not None else n * k
    used = [0] * e
    combine = torch.zeros(n, e, dtype=torch.float64)
    for r in range(k):
        for t in range(n):
            ex = int(top_i[t, r])
            if used[ex] < cap:
                used[ex] += 1
                combine[t, ex] = top_w[t, r]
    return combine


def _expert_choice_loop(logits, k, cf):
    n, e = logits.shape
    probs = torch.softmax(logits.double(), -1)
    cap = min(n, capacity(n, k, e, cf))
    combine = torch.zeros(n, e, dtype=torch.float64)
    for ex in range(e):
        ranked = sorted(range(n), key=lambda t: (-float(probs[t, ex]), t))  # ties: earlier token first
        for t in ranked[:cap]:
            combine[t, ex] = probs[t, ex]
    return combine


@pytest.mark.parametrize("cf", [None, 1.0, 0.5])
def test_token_choice_capacity_matches_loop(cf):
    logits = torch.randn(37, 5, generator=torch.Generator().manual_seed(7))
    d = route_token_choice(logits, 2, cf)
    ref = _token_choice_loop(logits, 2, cf)
    assert torch.equal(d.selected, ref > 0)
    assert torch.allclose(d.combine.double(), ref, atol=1e-6)
    assert int(d.dropped.sum()) == 37 * 2 - int((ref > 0).sum())


def test_expert_choice_matches_loop_with_ties():
    logits = torch.randn(30, 4, generator=torch.Generator().manual_seed(2))
    logits[20] = logits[3]  # exact ties: the earlier token (3) must win the contested slots
    logits[25] = logits[3]
    for cf in (0.5, 1.0, 2.0):
        d = route_expert_choice(logits, 2, cf)
        ref = _expert_choice_loop(logits, 2, cf)
        assert torch.equal(d.selected, ref > 0), cf
        assert torch.allclose(d.combine.double(), ref, atol=1e-6)


def test_dropped_tokens_change_only_their_own_rows(tmp_path):
    """With a capacity, the batch decides who is dropped; dropless, a request's logits do not depend on it."""
    hf = _hf_mixtral(seed=5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours, _ = load_pretrained(tmp_path)
    ids = _ids(4, 16)
    with torch.no_grad():
        alone = ours(ids[:1])
        together = ours(ids)[:1]
        assert torch.allclose(alone, together, atol=1e-5)  # dropless token choice: rows are independent
        set_routing(ours, "token_choice", capacity_factor=0.5)
        capped_alone, capped_together = ours(ids[:1]), ours(ids)[:1]
    assert not torch.allclose(capped_alone, capped_together, atol=1e-3)  # the other requests took its slots


def test_expert_choice_ties_go_to_the_earlier_token():
    """The tie-break the side channel rides on: equal probabilities, the earlier token in the batch wins."""
    d = route_expert_choice(torch.zeros(40, 4), 2, 1.0)  # every token ties for every expert; C = 20
    assert torch.equal(d.selected, (torch.arange(40) < 20)[:, None].expand(40, 4))


def test_shipped_moe_is_a_mixtral_checkpoint_transformers_reads():
    from labkit.checkpoint import DEFAULT_MODEL_DIR
    from labkit.moe import DEFAULT_MOE_DIR

    ours, tok = load_pretrained(DEFAULT_MOE_DIR)
    c = ours.config
    assert (c.model_type, c.num_local_experts, c.num_experts_per_tok) == ("mixtral", 8, 2)
    assert sum(p.stat().st_size for p in DEFAULT_MOE_DIR.iterdir()) <= 20 * 2**20
    assert (DEFAULT_MOE_DIR / "tokenizer.json").read_bytes() == (DEFAULT_MODEL_DIR / "tokenizer.json").read_bytes()
    assert "python -m labkit.train" in (DEFAULT_MOE_DIR / "README.md").read_text()
    hf = transformers.MixtralForCausalLM.from_pretrained(DEFAULT_MOE_DIR, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("It is a truth universally acknowledged")])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() < 1e-3


# --- the block's forward through the grouped-matmul kernel (kernels/moe.py) ---------------------------------------

def _block(seed=0):
    from labkit.config import LlamaConfig
    from labkit.moe import SparseMoeBlock

    cfg = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(seed)
    block = SparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5)  # a router far from uniform: experts get uneven loads
    return block


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shape", [(1, 1, 32), (2, 7, 32), (3, 19, 32)])
def test_kernel_forward_equals_the_loop(shape):
    block = _block().to(labkit.DEVICE)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])).to(labkit.DEVICE)
    with torch.no_grad():
        block.backend = "torch"
        ref = block(x)
        block.backend = "triton"  # the interpreter on the CPU, the compiled kernel on a GPU
        got = block(x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(60)
@pytest.mark.skipif(not INTERPRETER, reason="runs the kernel on CPU tensors, which only Triton's interpreter takes")
def test_auto_runs_the_kernel_only_on_cuda_and_only_dropless(monkeypatch):
    import labkit.moe as moe

    calls = []
    real = moe.fused_moe
    monkeypatch.setattr(moe, "fused_moe", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    block, x = _block(), torch.randn(5, 32)
    with torch.no_grad():
        block(x)  # auto on the CPU: the loop
        assert calls == []
        monkeypatch.setattr(moe, "MODE", "gpu")
        block(x)  # a GPU machine, but a CPU tensor: still the loop
        assert calls == []
        block.backend = "triton"
        block(x)
        assert calls == [1]
        set_routing(torch.nn.Sequential(block), "token_choice", capacity_factor=1.0)
        with pytest.raises(ValueError, match="dropless token choice"):
            block(x)
        block.backend = "auto"
        block(x)  # capacity routing stays on the loop
        assert calls == [1]
    with pytest.raises(ValueError, match="backend"):
        moe.set_moe_backend(torch.nn.Sequential(block), "cuda")


@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check: the compiled kernel inside the whole model")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_model_logits_kernel_vs_loop(tmp_path, dtype, monkeypatch):
    import labkit.moe as moe

    calls = []
    real = moe.fused_moe
    monkeypatch.setattr(moe, "fused_moe", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    _hf_mixtral().save_pretrained(tmp_path, safe_serialization=True)
    ours, _ = load_pretrained(tmp_path)
    ours = ours.to("cuda", dtype)
    ids = _ids().cuda()
    with torch.no_grad():
        moe.set_moe_backend(ours, "torch")
        ref = ours(ids).float()
        moe.set_moe_backend(ours, "auto")
        got = ours(ids).float()
    assert calls, "auto did not choose the kernel on CUDA"
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    assert ((got - ref).norm() / ref.norm()).item() < tol
