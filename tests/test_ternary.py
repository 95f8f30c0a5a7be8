"""Ternary weights: packing layout, absmean ternarisation, the Triton matmul against plain torch,
TernaryLinear / model swap / save-load, and the QAT straight-through estimator.

On the CPU the kernel runs in Triton's interpreter on tiny shapes in fp32; with a CUDA device the same
tests also run in fp16 and bf16, plus Llama-sized GEMV shapes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import labkit
import numpy as np

from kernels.ptx_sim import run_ptx
from kernels.ternary import (_TERNARY_WORD_DOT_ASM, pack_ternary, pack_ternary_words, ternary_matmul,
                             ternary_matmul_ref, ternary_matmul_words, ternary_matmul_words_ref, unpack_ternary,
                             unpack_ternary_words)
from labkit.config import LlamaConfig
from labkit.model import LlamaForCausalLM
from labkit.qat import QATLinear, finish_qat, prepare_qat, train_qat
from labkit.ternary import (
    TernaryLinear,
    absmean_ternarise,
    fake_ternarise,
    linear_weight_bytes,
    load_ternary,
    save_ternary,
    ternarise_model,
)

DEVICE = labkit.DEVICE
ON_GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32] + ([torch.float16, torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}  # ||out - ref|| / ||ref||


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite values in the kernel's output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def tiny_config(**kw):
    base = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=32)
    return LlamaConfig(**{**base, **kw})


# --- packing --------------------------------------------------------------------------------------
def test_bit_layout_of_one_byte():
    # weight 4j+i sits in bits 2i..2i+1 as code w + 1 (module docstring of kernels/ternary.py)
    assert pack_ternary(torch.tensor([[1, 0, -1, 1]])).item() == 0b10_00_01_10
    assert pack_ternary(torch.tensor([[-1, -1, -1, -1]])).item() == 0x00
    assert pack_ternary(torch.tensor([[0, 0, 0, 0]])).item() == 0x55
    assert pack_ternary(torch.tensor([[1, 1, 1, 1]])).item() == 0xAA
    assert pack_ternary(torch.tensor([[1, -1, -1, -1]])).item() == 0x02  # the first weight is the lowest bits


@pytest.mark.parametrize("shape", [(1, 4), (3, 8), (17, 36), (64, 128)])
def test_pack_unpack_round_trip(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    t = torch.randint(-1, 2, shape, generator=gen, dtype=torch.int8)
    packed = pack_ternary(t)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 4)
    assert torch.equal(unpack_ternary(packed), t)
    assert int(packed.max()) <= 0xAA  # no field ever holds the unused code 0b11


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_ternary(torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"-1, 0, \+1"):
        pack_ternary(torch.full((2, 4), 2))
    with pytest.raises(ValueError, match="ternarise"):
        pack_ternary(torch.full((2, 4), 0.5))


# --- absmean ternarisation ------------------------------------------------------------------------
def test_absmean_matches_the_bitnet_formula():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=gen)
    t, scale = absmean_ternarise(w)
    assert set(t.unique().tolist()) <= {-1, 0, 1}
    assert torch.allclose(scale, w.abs().mean().reshape(1))
    assert torch.equal(t.float(), (w / (scale + 1e-5)).round().clamp(-1, 1))
    t_row, scale_row = absmean_ternarise(w, "row")
    assert scale_row.shape == (16,) and torch.allclose(scale_row, w.abs().mean(1))
    # a Gaussian matrix: |w| < 0.5 * mean|w| for about 31% of entries -> zeros
    assert 0.2 < (t == 0).float().mean() < 0.45


def test_fake_ternarise_is_straight_through():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 12, generator=gen, requires_grad=True)
    wq = fake_ternarise(w)
    t, scale = absmean_ternarise(w)
    assert torch.allclose(wq, t.float() * scale)  # forward: the ternary weight
    upstream = torch.randn(8, 12, generator=gen)
    wq.backward(upstream)
    assert torch.equal(w.grad, upstream)  # backward: identity


# --- the kernel -----------------------------------------------------------------------------------
CASES = [(1, 24, 40), (2, 16, 64), (3, 33, 68), (5, 20, 36), (17, 40, 132)]  # (m, n, k): GEMV and tl.dot paths


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar_scale", "row_scale"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_reference(case, per_row, dtype):
    m, n, k = case
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    t = torch.randint(-1, 2, (n, k), generator=gen)
    packed = pack_ternary(t).to(DEVICE)
    scale = (torch.rand(n, generator=gen) + 0.5) if per_row else 0.37
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    out = ternary_matmul(x, packed, scale.to(DEVICE) if per_row else scale)
    assert out.shape == (m, n) and out.dtype == dtype
    exact = x.double() @ t.double().to(DEVICE).T * (scale.double().to(DEVICE) if per_row else scale)
    assert rel_err(out, exact) < TOL[dtype]
    assert rel_err(ternary_matmul_ref(x, packed, scale.to(DEVICE) if per_row else scale), exact) < TOL[dtype]


def test_kernel_strided_input_and_tensor_scale():
    gen = torch.Generator().manual_seed(7)
    t = torch.randint(-1, 2, (12, 32), generator=gen)
    x = torch.randn(32, 3, generator=gen).T.to(DEVICE)  # (3, 32), not contiguous
    out = ternary_matmul(x, pack_ternary(t).to(DEVICE), torch.tensor(2.0))
    assert rel_err(out, 2.0 * x.double() @ t.double().to(DEVICE).T) < 1e-5


@pytest.mark.skipif(not ON_GPU, reason="Llama-sized shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 4096, 4096), (1, 14336, 4096), (4, 4096, 14336), (16, 4096, 4096),
                                   (64, 1024, 4096)])
def test_gpu_llama_shapes(m, n, k, dtype):
    gen = torch.Generator().manual_seed(m + n + k)
    t = torch.randint(-1, 2, (n, k), generator=gen)
    scale = torch.rand(n, generator=gen) * 0.02 + 0.01
    x = torch.randn(m, k, generator=gen).to(dtype).cuda()
    packed, scale = pack_ternary(t).cuda(), scale.cuda()
    out = ternary_matmul(x, packed, scale)
    ref = x.double() @ t.double().cuda().T * scale.double()
    assert rel_err(out, ref) < TOL[dtype]


# --- v2: the words layout and its GEMV ------------------------------------------------------------
def _word(packed: torch.Tensor, row: int, i: int) -> int:
    return int.from_bytes(bytes(packed[row, 4 * i: 4 * i + 4].tolist()), "little")


def test_words_layout_matches_the_docstring_and_round_trips():
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(-1, 2, (3, 512), generator=gen, dtype=torch.int8)
    packed = pack_ternary_words(t)
    assert packed.shape == (3, 128) and torch.equal(unpack_ternary_words(packed), t)
    for blk, i in ((0, 0), (0, 5), (1, 15)):  # word i of block b: slot s = 2j + h <-> x64[64b + i + 16j], pair h
        w = _word(packed, 2, 16 * blk + i)
        for s in range(8):
            k = 4 * (64 * blk + i + 16 * (s // 2)) + 2 * (s % 2)
            assert ((w >> 2 * s) & 3) - 1 == int(t[2, k]) and ((w >> 16 + 2 * s) & 3) - 1 == int(t[2, k + 1])
    with pytest.raises(ValueError, match="multiple of 256"):
        pack_ternary_words(torch.zeros(2, 128))
    with pytest.raises(ValueError, match=r"-1, 0, \+1"):
        pack_ternary_words(torch.full((2, 256), 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else []), ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 5, 256), (1, 7, 768), (2, 3, 512)])
def test_words_kernel_matches_reference(m, n, k, dtype):
    # odd n (rows past n clamped), k = 768: three blocks, so steps of 2 leave a masked tail; whole steps otherwise
    gen = torch.Generator().manual_seed(m + n + k)
    t = torch.randint(-1, 2, (n, k), generator=gen)
    packed = pack_ternary_words(t).to(DEVICE)
    scale = (torch.rand(n, generator=gen) + 0.5).to(DEVICE)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    exact = x.double() @ t.double().to(DEVICE).T * scale.double()
    assert rel_err(ternary_matmul_words_ref(x, packed, scale), exact) < TOL[dtype]
    for cfg in (None, dict(BLOCK_KB=64, PREFETCH=False), dict(BLOCK_N=2, BLOCK_KB=128, SPLIT_K=2, num_warps=1)):
        out = ternary_matmul_words(x, packed, scale, cfg)
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_err(out, exact) < TOL[dtype], f"{cfg}: {rel_err(out, exact):.2e}"


def test_ternary_word_asm_in_the_simulator():
    # The PTX block itself, bit for bit on the CPU: 64 rows of one 256-weight block, every code in every slot.
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(-1, 2, (64, 256), generator=gen)
    words = pack_ternary_words(t).numpy().view("uint32")  # (64, 16)
    x = torch.randn(256, generator=gen).half().numpy()
    x64 = x.view("uint64")  # (64,): four inputs each
    total = np.zeros(64)
    for i in range(16):
        xs = [np.broadcast_to(x64[i + 16 * j], (64,)) for j in range(4)]
        total += run_ptx(_TERNARY_WORD_DOT_ASM.value, [words[:, i], *xs])[0]
    exact = t.double().numpy() @ x.astype("float64")
    bound = 2.0 ** -10 * 8 * np.abs(x.astype("float64")).sum()  # products exact; fp16 sums of 8 per lane
    assert (abs(total - exact) <= bound).all() and abs(total - exact).max() > 0  # (fp16 sums do round)


def test_ternary_linear_words_layout_matches_bytes_layout():
    torch.manual_seed(4)
    lin = nn.Linear(256, 24, bias=True)
    a = TernaryLinear.from_linear(lin, "row", backend="torch")
    b = TernaryLinear.from_linear(lin, "row", backend="triton", layout="words").to(DEVICE)
    assert torch.equal(a.dequantised_weight(), b.dequantised_weight().cpu())
    x = torch.randn(1, 2, 256)
    assert torch.allclose(a(x), b(x.to(DEVICE)).cpu(), atol=1e-4)
    with pytest.raises(ValueError, match="multiple of 256"):
        TernaryLinear(128, 8, layout="words")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="Llama-sized shapes need a GPU")
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4095, 14336)])
def test_gpu_words_kernel_llama_shapes(n, k):
    # the inline-PTX path (fp16) against float64; x * 100 stays inside the documented fp16 bound (|x| < 8,000)
    gen = torch.Generator().manual_seed(n + k)
    t = torch.randint(-1, 2, (n, k), generator=gen)
    scale = (torch.rand(n, generator=gen) * 0.02 + 0.01).cuda()
    packed = pack_ternary_words(t).cuda()
    for x_scale in (1.0, 100.0):
        x = (torch.randn(1, k, generator=gen) * x_scale).half().cuda()
        ref = x.double() @ t.double().cuda().T * scale.double()
        for cfg in (None, dict(BLOCK_KB=256, num_warps=2), dict(BLOCK_N=8, BLOCK_KB=1024, SPLIT_K=2),
                    dict(BLOCK_KB=512, PREFETCH=False, num_warps=2)):
            assert rel_err(ternary_matmul_words(x, packed, scale, cfg), ref) < TOL[torch.float16], (x_scale, cfg)


@pytest.mark.parametrize("bad, message", [
    (lambda x, p, s: (x[0], p, s), "2-D"),
    (lambda x, p, s: (x.to(torch.int32), p, s), "float16, bfloat16 or float32"),
    (lambda x, p, s: (x, p.to(torch.int8), s), "uint8"),
    (lambda x, p, s: (x[:, :4], p, s), "k // 4"),
    (lambda x, p, s: (x, p, torch.ones(3)), "one per output row"),
])
def test_kernel_rejects_bad_input(bad, message):
    x = torch.randn(2, 16, device=DEVICE)
    p = pack_ternary(torch.zeros(5, 16)).to(DEVICE)
    with pytest.raises(ValueError, match=message):
        ternary_matmul(*bad(x, p, 1.0))


# --- TernaryLinear, model swap, save / load -------------------------------------------------------
@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_ternary_linear_matches_its_dequantised_weight(granularity):
    torch.manual_seed(0)
    lin = nn.Linear(32, 24, bias=True)
    tl_torch = TernaryLinear.from_linear(lin, granularity, backend="torch")
    x = torch.randn(2, 3, 32)
    expected = F.linear(x, tl_torch.dequantised_weight(), lin.bias)
    assert torch.allclose(tl_torch(x), expected, atol=1e-5)
    tl_triton = TernaryLinear.from_linear(lin, granularity, backend="triton").to(DEVICE)
    assert torch.allclose(tl_triton(x.to(DEVICE)).cpu(), expected, atol=1e-5)


def test_ternarise_model_swaps_every_decoder_linear_and_shrinks_it():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    before = linear_weight_bytes(model)["decoder_linears"]
    ternarise_model(model)
    swapped = [n for n, m in model.named_modules() if isinstance(m, TernaryLinear)]
    assert len(swapped) == 7 * model.config.num_hidden_layers
    assert isinstance(model.lm_head, nn.Linear)  # embeddings / lm_head stay in full precision
    after = linear_weight_bytes(model)["decoder_linears"]
    assert before / after > 15  # fp32 -> 2 bits, plus one fp32 scale per matrix
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        assert torch.isfinite(model(ids)).all()


def test_model_triton_backend_matches_torch_backend():
    torch.manual_seed(1)
    cfg = tiny_config(num_hidden_layers=1)
    a = ternarise_model(LlamaForCausalLM(cfg).eval(), backend="torch")
    b = ternarise_model(LlamaForCausalLM(cfg).eval(), backend="triton")
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert torch.allclose(a(ids), b.to(DEVICE)(ids.to(DEVICE)).cpu(), atol=1e-4)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(2)
    model = ternarise_model(LlamaForCausalLM(tiny_config()).eval(), "row")
    save_ternary(model, tmp_path, other_dtype=torch.float32)
    loaded, tokenizer = load_ternary(tmp_path, backend="torch")
    assert tokenizer is None
    ids = torch.randint(0, 96, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size < sum(p.numel() * 4 for p in LlamaForCausalLM(tiny_config()).parameters())


# --- QAT ------------------------------------------------------------------------------------------
def test_qat_trains_latent_weights_and_exports_exactly():
    torch.manual_seed(3)
    model = LlamaForCausalLM(tiny_config())
    prepare_qat(model)
    qat_layers = [m for m in model.modules() if isinstance(m, QATLinear)]
    assert len(qat_layers) == 14
    before = qat_layers[0].weight.detach().clone()
    ids = torch.randint(0, 96, (2000,))
    log = train_qat(model, ids, steps=3, batch_size=2, seq_len=16, lr=1e-2, seed=0, log_every=1)
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert not torch.equal(before, qat_layers[0].weight)  # the straight-through gradient reached W
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        qat_logits = model(x)
        finish_qat(model)  # ternarise the latent weights with the very function the forward used
        assert not any(isinstance(m, QATLinear) for m in model.modules())
        assert torch.allclose(model(x), qat_logits, atol=1e-4)
