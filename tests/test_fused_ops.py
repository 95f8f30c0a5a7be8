"""Fused ops (kernels/fused_ops.py, labkit/fused_ops.py): each kernel against its torch reference and against the
model's own formula (float64), the fused model's logits and greedy tokens against the unfused model's, and
quantising after fusing against quantising the unfused model. On the CPU the kernels run in Triton's interpreter;
on a GPU the same tests run them compiled, in fp32, fp16 and bf16."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import labkit  # noqa: F401  (CPU/GPU mode first)
from kernels import fused_ops as fk
from labkit.config import LlamaConfig
from labkit.engine import EngineConfig, LLMEngine, SamplingParams
from labkit.fused_ops import fuse_model, is_fused
from labkit.model import LlamaForCausalLM, RMSNorm, RotaryEmbedding, rotate_half
from labkit.quant import quantize_model

pytestmark = pytest.mark.timeout(240)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if DEV == "cuda" else [torch.float32]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to the values' scale

# head_dim 16: the GPU attention kernels need a power of two >= 16
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rope_theta=500000.0)
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=32)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def make(seed=0, dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    with torch.device(DEV):
        model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model.to(dtype).eval()


def close(got, want, dtype):
    scale = want.double().abs().max().clamp(min=1.0)
    err = (got.double() - want.double()).abs().max() / scale
    assert err <= TOL[dtype], f"max error {float(err):.3g} (relative to {float(scale):.3g}) > {TOL[dtype]}"


# ---- kernels against their references and the model's formulas -----------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,H", [(1, 32), (5, 48)])
def test_rms_norm(dtype, T, H):
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=gen).to(DEV, dtype)
    r = torch.randn(T, H, generator=gen).to(DEV, dtype)
    norm = RMSNorm(H, 1e-5).to(DEV)
    norm.weight.data = (1 + 0.1 * torch.randn(H, generator=gen)).to(DEV, dtype)
    close(fk.rms_norm(x, norm.weight, norm.eps), fk.rms_norm_ref(x, norm.weight, norm.eps), dtype)
    want = RMSNorm(H, 1e-5).double().to(DEV)
    want.weight.data = norm.weight.data.double()
    close(fk.rms_norm(x, norm.weight, norm.eps), want(x.double()), dtype)  # the model's module, in float64
    y, s = fk.add_rms_norm(x, r, norm.weight, norm.eps)
    y_ref, s_ref = fk.add_rms_norm_ref(x, r, norm.weight, norm.eps)
    assert torch.equal(s, s_ref)  # the new residual is one rounded add: exact
    close(y, y_ref, dtype)
    close(y, want(x.double() + r.double()), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,I", [(1, 24), (3, 2100)])  # 2100: several column blocks, a ragged last one
def test_silu_mul(dtype, T, I):
    gen = torch.Generator().manual_seed(I)
    gate_up = (2 * torch.randn(T, 2 * I, generator=gen)).to(DEV, dtype)
    got = fk.silu_mul(gate_up)
    close(got, fk.silu_mul_ref(gate_up), dtype)
    g, u = gate_up.double()[:, :I], gate_up.double()[:, I:]
    close(got, g * torch.sigmoid(g) * u, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["default", "llama3"])
def test_rope_matches_model_rotary(dtype, scaling):
    Hq, Hkv, D = 6, 3, 16  # head counts not powers of two: head tiles wider than the heads
    cfg = LlamaConfig(**{**TINY, "head_dim": D, "num_attention_heads": Hq, "num_key_value_heads": Hkv,
                         "rope_scaling": scaling})
    T = 6
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(T, (Hq + 2 * Hkv) * D, generator=gen).to(DEV, dtype)
    positions = torch.tensor([0, 1, 7, 31, 64, 127], device=DEV)
    rotary = RotaryEmbedding(cfg).to(DEV)
    table = fk.rope_cos_sin(rotary.inv_freq, cfg.max_position_embeddings)
    q, k = fk.rope(qkv, positions, table, Hq, Hkv)
    q_ref, k_ref = fk.rope_ref(qkv, positions, table, Hq, Hkv)
    close(q, q_ref, dtype)
    close(k, k_ref, dtype)
    # the model's own formula: x * cos + rotate_half(x) * sin with RotaryEmbedding's tables (float64 arithmetic)
    cos, sin = rotary(positions[None], torch.float64)  # (1, 1, T, D)
    heads = qkv.double().view(T, Hq + 2 * Hkv, D).transpose(0, 1)[None]  # (1, H, T, D)
    want = (heads * cos + rotate_half(heads) * sin)[0].transpose(0, 1)  # (T, H, D)
    close(q, want[:, :Hq], dtype)
    close(k, want[:, Hq:Hq + Hkv], dtype)


def test_kernel_bad_input():
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match="weight must be"):
        fk.rms_norm(x, torch.ones(7, device=DEV), 1e-5)
    with pytest.raises(ValueError, match="even"):
        fk.silu_mul(torch.randn(2, 7, device=DEV))
    table = torch.zeros(16, 8, device=DEV)
    with pytest.raises(ValueError, match="num_kv_heads"):
        fk.rope(torch.randn(2, 40, device=DEV), torch.zeros(2, dtype=torch.long, device=DEV), table, 4, 2)
    with pytest.raises(ValueError, match="float32"):
        fk.rope(torch.randn(2, 64, device=DEV), torch.zeros(2, dtype=torch.long, device=DEV), table.half(), 4, 2)


# ---- the fused model ------------------------------------------------------------------------------------------
BACKEND = "triton" if DEV == "cpu" else "auto"  # CPU: the interpreted kernels, not only their references
LOGITS_TOL = 1e-5 if DEV == "cpu" else 1e-4


@pytest.mark.parametrize("overrides", [{}, dict(qkv_bias=True, rope_scaling=LLAMA3_SCALING)],
                         ids=["plain", "bias+llama3"])
def test_fused_logits_equal_unfused(overrides):
    model = make(**overrides)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 9), generator=gen).to(DEV)
    positions = torch.arange(9, device=DEV).expand(2, 9) + torch.tensor([[0], [50]], device=DEV)
    with torch.no_grad():
        want = model(ids, positions)
        fused = fuse_model(copy.deepcopy(model), backend=BACKEND)
        got = fused(ids, positions)
        got_rows = fused(ids, positions, logits_indices=torch.tensor([3, 8], device=DEV))
    assert is_fused(fused) and not hasattr(fused.model.layers[0].self_attn, "q_proj")
    assert (got - want).abs().max() <= LOGITS_TOL
    assert (got_rows - want[:, [3, 8]]).abs().max() <= LOGITS_TOL


def test_fuse_model_bad_input():
    model = fuse_model(make(), backend="torch")
    with pytest.raises(ValueError, match="already fused"):
        fuse_model(model)
    quantised = quantize_model(make(hidden_size=128, intermediate_size=256, head_dim=32), "int8", backend="torch")
    state = {k: v.clone() for k, v in quantised.state_dict().items()}
    with pytest.raises(ValueError, match="before quantize_model"):
        fuse_model(quantised)
    assert all(torch.equal(v, quantised.state_dict()[k]) for k, v in state.items())  # left as it was
    with pytest.raises(ValueError, match="backend"):
        fuse_model(make(), backend="cuda")
    with pytest.raises(ValueError, match="fused_ops"):
        EngineConfig(batch_invariant=True, fused_ops=True)


def greedy(model, prompts, **config) -> list[list[int]]:
    cfg = EngineConfig(num_blocks=32, block_size=16, max_num_seqs=4, max_num_batched_tokens=64, **config)
    engine = LLMEngine(model, cfg, eos_token_ids=())
    seqs = [engine.add_request(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in prompts]
    engine.run()
    return [list(s.output_token_ids) for s in seqs]


def test_engine_greedy_tokens_unchanged():
    """Prefill, chunked prefill and decode (CUDA graphs on a GPU) through LLMEngine: the same tokens fused."""
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in (5, 40, 17)]
    model = make()
    want = greedy(model, prompts)
    assert greedy(copy.deepcopy(model), prompts, fused_ops=True) == want  # EngineConfig's hook (CPU: torch ops)
    assert greedy(fuse_model(copy.deepcopy(model), backend=BACKEND), prompts) == want  # the kernels themselves


@pytest.mark.parametrize("scheme", ["int8", "int4_g128"])
def test_quantize_after_fuse(scheme):
    """int8 / int4 scales are per output row (group), so quantising qkv_proj gives exactly the codes of quantising
    q, k and v apart: the fused-then-quantised model computes what the quantised unfused model does."""
    shape = dict(hidden_size=128, intermediate_size=256, head_dim=32)  # multiples of 128: int4 g128 groups
    model = make(**shape)
    ids = torch.randint(0, TINY["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(4)).to(DEV)
    with torch.no_grad():
        want = quantize_model(copy.deepcopy(model), scheme, backend="torch")(ids)
        fused = quantize_model(fuse_model(copy.deepcopy(model), backend=BACKEND), scheme, backend="torch")
        got = fused(ids)
    assert type(fused.model.layers[0].self_attn.qkv_proj).__name__ == "QuantLinear"
    assert type(fused.model.layers[0].mlp.gate_up_proj).__name__ == "QuantLinear"
    assert (got - want).abs().max() <= LOGITS_TOL
