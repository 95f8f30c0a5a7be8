"""Weight-only quantisation (labkit.quant) and its Triton kernels (kernels.quant_matmul) against plain torch.

On the CPU the kernels run in Triton's interpreter on tiny shapes (fp32 and fp16); with a CUDA device the
same tests run in fp16 and bf16 too, plus Llama-sized shapes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import labkit
from kernels.ptx_sim import run_ptx
from kernels.quant_matmul import (_INT8_WORD_DOT_ASM, default_config, int4_fmin_matmul, int4_fmin_matmul_ref,
                                  int4_matmul, int4_matmul_ref, int8_matmul, int8_matmul_ref, pack_int4,
                                  unpack_int4)
from kernels.quant_matmul_small_m import int4_small_m_matmul
from labkit.quant import (SCHEMES, QuantLinear, dequantize, group_scale_zero, linear_bytes,
                          load_quantized_state_dict, quantize_model, quantize_state_dict, quantize_tensor)

DEVICE = labkit.DEVICE
ON_GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # ||out - ref|| / ||ref||


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite values in the kernel's output"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def gemv(**kw):
    return {**dict(path="gemv", BLOCK_N=8, MAGIC=True, PREFETCH=True, num_warps=4), **kw}


def gemm(**kw):
    return dict(path="gemm", BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, **kw)


# ----------------------------------------------------------------------------- layout and quantisers
def test_int4_layout_matches_the_docstring_and_round_trips():
    q = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)  # one group of 32: codes 0..15, 0..15
    packed = pack_int4(q, 32)
    assert packed.shape == (1, 16)
    assert int(packed[0, 0]) == (int(q[0, 16]) << 4) | int(q[0, 0])  # byte j = code[j + G/2] << 4 | code[j]
    assert int(packed[0, 5]) == (int(q[0, 21]) << 4) | int(q[0, 5])
    gen = torch.Generator().manual_seed(0)
    for g in (32, 64, 128):
        codes = torch.randint(0, 16, (5, 2 * g), generator=gen, dtype=torch.uint8)
        assert torch.equal(unpack_int4(pack_int4(codes, g), g), codes)


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_quantize_error_is_within_half_a_step(scheme):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 256, generator=gen) * 0.05
    w[3, :64] = 0.0  # an all-zero group and row part must survive
    qt = quantize_tensor(w, scheme)
    deq = dequantize(qt, torch.float32)
    assert deq.shape == w.shape
    if qt.scheme.bits == 8:
        step = qt.scales.float()[:, None]
        assert qt.qweight.dtype == torch.int8 and int(qt.qweight.abs().max()) <= 127
    else:
        g = qt.scheme.group_size
        step = qt.scales.float().repeat_interleave(g, dim=1)
        assert int(unpack_int4(qt.qweight, g).max()) <= 15 and (qt.zeros is None or int(qt.zeros.max()) <= 15)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    if qt.scheme.float_min:  # 0.0 is on the grid only where a whole group is zero (Q4_1's trade-off)
        g = qt.scheme.group_size
        assert (deq[3, : 64 // g * g] == 0).all()
    else:
        assert (deq[3, :64] == 0).all(), "zero must be exactly representable"


def test_group_scale_zero_of_one_group():
    scale, zero = group_scale_zero(torch.tensor([-1.5, 0.0, 0.5, 3.0]))
    assert torch.isclose(scale, torch.tensor(4.5 / 15)) and int(zero) == 5  # round(1.5 / 0.3)


def test_padding_keeps_the_weight_and_costs_bytes():
    w = torch.randn(8, 100)
    with pytest.raises(ValueError, match="not a multiple of the group size 64"):
        quantize_tensor(w, "int4_g64")
    qt = quantize_tensor(w, "int4_g64", pad=True)
    assert qt.qweight.shape == (8, 64) and dequantize(qt).shape == (8, 100)
    assert linear_bytes(8, 100, "int4_g64", scale_bytes=4) == qt.nbytes == 8 * (128 // 2 + 2 * (4 + 1))


@pytest.mark.parametrize("bad, match", [
    (torch.randn(4, 64).to(torch.int32), "floating-point"),
    (torch.randn(64), "2-D"),
    (torch.full((4, 64), float("nan")), "NaN"),
])
def test_quantize_rejects_bad_weights(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize_tensor(bad, "int4_g32")


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown quantisation scheme"):
        quantize_tensor(torch.randn(4, 64), "int3")


# ----------------------------------------------------------------------------- kernels
def _int4_problem(gen, m, n, k, g, dtype):
    kp = -(-k // g) * g
    codes = torch.randint(0, 16, (n, kp), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, kp // g, generator=gen) + 0.5).to(dtype if dtype != torch.float32 else torch.float32)
    zeros = torch.randint(0, 16, (n, kp // g), generator=gen, dtype=torch.uint8)
    x = torch.randn(m, k, generator=gen).to(dtype)
    return [t.to(DEVICE) for t in (x, pack_int4(codes, g), scales, zeros)]


CASES = [(1, 24, 128), (3, 40, 100), (17, 24, 64)]  # (m, n, k): GEMV sizes, ragged n and k, a GEMM size


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("m,n,k", CASES)
def test_int4_kernels_match_reference(dtype, group, m, n, k):
    x, qweight, scales, zeros = _int4_problem(torch.Generator().manual_seed(m * n + k), m, n, k, group, dtype)
    ref = int4_matmul_ref(x, qweight, scales, zeros, group)
    # GEMV (fp32 maths; fp16-pair maths, inline PTX on the GPU), GEMV split over k, the word-at-a-time GEMV
    # (one PTX block a word on the GPU for fp16; whole steps and a split), GEMM, and the default
    for cfg in (gemv(GROUPS=2), gemv(GROUPS=2, HALF_MATH=True), gemv(GROUPS=1, MAGIC=False, PREFETCH=False, SPLIT_K=3),
                gemv(WORDS=True, GROUPS=2), gemv(WORDS=True, BLOCK_N=4, GROUPS=1, PREFETCH=False, SPLIT_K=2),
                gemv(WORDS=True, GROUPS=1, PREFETCH=2), gemv(WORDS=True, GROUPS=2, PREFETCH=0, STAGES=3),
                gemm(SPLIT_K=2), gemm(GROUPS=2), None):
        out = int4_matmul(x, qweight, scales, zeros, group, config=cfg)
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], f"{cfg}: {rel_err(out, ref):.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", CASES)
def test_int4_fmin_kernel_path_matches_reference(dtype, m, n, k):
    # w = q * scale + min with a free float minimum (Q4_1's grid): the zero-point kernel with zeros = 0 plus
    # the minima times the groups' input sums. Minima near -7.5 * scale make the two sums cancel, as real ones do.
    x, qweight, scales, _ = _int4_problem(torch.Generator().manual_seed(m + 3 * n + k), m, n, k, 32, dtype)
    noise = torch.randn(scales.shape, generator=torch.Generator().manual_seed(1)).to(scales.device)  # CPU draw
    mins = (-7.5 * scales.float() + 0.1 * noise).to(scales.dtype)
    ref = int4_fmin_matmul_ref(x, qweight, scales, mins, 32)
    for cfg in (gemv(GROUPS=2), gemv(WORDS=True, GROUPS=2), gemm(GROUPS=2), None):
        out = int4_fmin_matmul(x, qweight, scales, mins, 32, config=cfg)
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_err(out, ref) < 3 * TOL[dtype], f"{cfg}: {rel_err(out, ref):.2e}"


def test_float_min_grid_fits_a_range_without_zero_and_q4_1_exactly():
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

    gen = torch.Generator().manual_seed(0)
    w = torch.rand(16, 128, generator=gen) * 0.1 + 0.2  # every group in [0.2, 0.3]: far from 0
    err = {s: (dequantize(quantize_tensor(w, s)) - w).abs().max().item() for s in ("int4_g32", "int4_fmin_g32")}
    assert err["int4_fmin_g32"] < err["int4_g32"] / 2.5, err  # the zero-point grid must stretch down to 0 (3x coarser)
    # gguf's own Q4_1 of a weight, read as int4_fmin_g32 codes, dequantises to exactly gguf's numbers.
    w = torch.randn(16, 128, generator=gen) * 0.05
    blocks = gguf_quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_1).reshape(16, -1, 20)
    d = torch.from_numpy(blocks[..., 0:2].copy().view("float16")[..., 0])
    m = torch.from_numpy(blocks[..., 2:4].copy().view("float16")[..., 0])
    codes = torch.from_numpy(blocks[..., 4:].reshape(16, -1).copy())
    layer = QuantLinear.from_codes("int4_fmin_g32", codes, d, m, 128)
    want = torch.from_numpy(gguf_dequantize(blocks.reshape(16, -1), gguf.GGMLQuantizationType.Q4_1))
    assert torch.equal(layer.dequantized_weight(), want)
    # Re-quantising those weights: the float-min grid (fp16 scales, as Q4_1) gives them back, the zero-point one not.
    again = dequantize(quantize_tensor(want, "int4_fmin_g32", scale_dtype=torch.float16), torch.float32)
    assert (again - want).abs().max() < 1e-6
    assert (dequantize(quantize_tensor(want, "int4_g32")) - want).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", CASES)
def test_int8_kernels_match_reference(dtype, m, n, k):
    gen = torch.Generator().manual_seed(m + n + k)
    qweight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(DEVICE)
    scales = (torch.rand(n, generator=gen) + 0.5).to(DEVICE)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    ref = int8_matmul_ref(x, qweight, scales)
    for cfg in (gemv(BLOCK_K=32), gemv(BLOCK_K=16, MAGIC=False, PREFETCH=False, SPLIT_K=3),
                gemm(BLOCK_K=32, SPLIT_K=2), None):
        out = int8_matmul(x, qweight, scales, config=cfg)
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], f"{cfg}: {rel_err(out, ref):.2e}"


def words(**kw):
    return {**dict(path="gemv", WORDS=True, BLOCK_N=4, PREFETCH=True, num_warps=1), **kw}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", [(1, 5, 64), (1, 7, 36), (2, 3, 256)])
def test_int8_word_gemv_matches_reference(dtype, m, n, k):
    # odd n (rows past n are clamped, not masked), k = 36: a masked last step, k = 64 / 256: whole steps only
    gen = torch.Generator().manual_seed(3 * m + n + k)
    qweight = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8).to(DEVICE)
    scales = (torch.rand(n, generator=gen) + 0.5).to(DEVICE)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    ref = int8_matmul_ref(x, qweight, scales)
    for cfg in (words(BLOCK_K=16), words(BLOCK_K=64, PREFETCH=False), words(BLOCK_K=16, BLOCK_N=2, SPLIT_K=2), None):
        out = int8_matmul(x, qweight, scales, config=cfg)
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], f"{cfg}: {rel_err(out, ref):.2e}"


def test_int8_word_asm_is_exact_up_to_fp16_rounding():
    # The PTX block itself, simulated bit for bit on the CPU: every byte value -128..127 in every byte position.
    q = torch.arange(-128, 128, dtype=torch.int8)
    q = torch.stack([q.roll(17 * b) for b in range(4)], dim=1).numpy()  # (256, 4): word i's four weights
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0)).half().numpy()
    out = run_ptx(_INT8_WORD_DOT_ASM.value, [q.view("uint32")[:, 0], x.view("uint64")[:, 0]])[0]
    exact = (q.astype("float64") / 128 * x.astype("float64")).sum(1)  # the block returns sum(q * x) / 128
    bound = 2.0 ** -10 * (abs(q.astype("float64")) / 128 * abs(x.astype("float64"))).sum(1)  # a few fp16 roundings
    assert (abs(out - exact) <= bound + 1e-7).all()


def test_int8_words_needs_whole_words():
    x, qweight, scales = torch.randn(1, 38), torch.ones(4, 38, dtype=torch.int8), torch.ones(4)
    with pytest.raises(ValueError, match="multiple of 4"):
        int8_matmul(x.to(DEVICE), qweight.to(DEVICE), scales.to(DEVICE), config=words(BLOCK_K=16))
    with pytest.raises(ValueError, match="power of two"):
        int8_matmul(x[:, :36].to(DEVICE), qweight[:, :36].to(DEVICE), scales.to(DEVICE), config=words(BLOCK_K=24))
    # the default falls back to the fp32 GEMV where words do not fit
    assert rel_err(int8_matmul(x.half().to(DEVICE), qweight.to(DEVICE), scales.to(DEVICE)),
                   int8_matmul_ref(x.half().to(DEVICE), qweight.to(DEVICE), scales.to(DEVICE))) < TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336), (14335, 4096)])
def test_int8_word_gemv_on_llama_shapes(n, k):
    # the inline-PTX path against the fp32 reference; x * 300 stays inside the documented fp16 bound (|x| < 32,000)
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).half()
    qt = quantize_tensor(w, "int8")
    for x_scale in (1.0, 300.0):
        x = (torch.randn(1, k, device="cuda", generator=gen) * x_scale).half()
        ref = x.float() @ dequantize(qt, torch.float32).T
        for cfg in (None, words(BLOCK_K=1024, num_warps=4), words(BLOCK_K=512, num_warps=2, SPLIT_K=2),
                    words(BLOCK_K=256, BLOCK_N=8, PREFETCH=False, num_warps=2)):
            out = int8_matmul(x, qt.qweight, qt.scales, config=cfg)
            assert rel_err(out, ref) < TOL[torch.float16], (x_scale, cfg)


def test_int4_word_gemv_unpacks_every_nibble_in_place():
    # one row, codes 0..15 twice over in each group: any mix-up of bytes, nibbles or halves moves the result
    for g in (32, 64, 128):
        codes = (torch.arange(4 * g) % 16).to(torch.uint8).reshape(1, 4 * g)
        scales, zeros = torch.ones(1, 4, dtype=torch.float16), torch.tensor([[0, 3, 8, 15]], dtype=torch.uint8)
        x = torch.linspace(-1, 1, 4 * g).reshape(1, 4 * g).to(torch.float16)
        qweight = pack_int4(codes, g)
        args = [t.to(DEVICE) for t in (x, qweight, scales, zeros)]
        ref = int4_matmul_ref(*args, g)
        for groups in (1, 4):  # masked last steps, then whole steps (no masks)
            for prefetch in (True, 2):  # one step in flight; two (4 steps of 1 group: the loads rotate through both)
                cfg = dict(path="gemv", WORDS=True, BLOCK_N=2, GROUPS=groups, PREFETCH=prefetch, num_warps=1)
                out = int4_matmul(*args, g, config=cfg)
                assert rel_err(out, ref) < TOL[torch.float16], (g, groups, prefetch)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336)])
def test_int4_word_gemv_on_llama_shapes(n, k):
    # fp16 sums of eight products inside each word: must stay well inside fp16's tolerance at k = 14336
    gen = torch.Generator(device="cuda").manual_seed(k)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).half()
    x = torch.randn(1, k, device="cuda", generator=gen).half()
    for scheme in ("int4_g32", "int4_g128"):
        qt = quantize_tensor(w, scheme)
        ref = x.float() @ dequantize(qt, torch.float32).T
        for cfg in (None, dict(path="gemv", WORDS=True, BLOCK_N=4, GROUPS=4, PREFETCH=True, num_warps=2, SPLIT_K=2),
                    dict(path="gemv", WORDS=True, BLOCK_N=4, GROUPS=8, PREFETCH=2, num_warps=4),
                    dict(path="gemv", WORDS=True, BLOCK_N=4, GROUPS=8, PREFETCH=0, STAGES=3, num_warps=4)):
            out = int4_matmul(x, qt.qweight, qt.scales, qt.zeros, qt.scheme.group_size, config=cfg)
            assert rel_err(out, ref) < 1e-2, (scheme, cfg)


# swap-AB small-m kernel: the whole-step tile (EVEN_K), a masked tail step (GROUPS = 3), split k, scaled tiles,
# a second block of x's rows (BLOCK_M = 16 < m would need m > 16: BLOCK_N = 16 and BLOCK_M = 32 instead)
SMALL_M = [dict(), dict(BLOCK_N=32, GROUPS=3), dict(BLOCK_N=16, GROUPS=2, SPLIT_K=2), dict(SCALE_TILE=True, GROUPS=2),
           dict(BLOCK_N=16, BLOCK_M=32, GROUPS=1, num_stages=2)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k,group", [(2, 48, 256, 32), (5, 96, 256, 128), (16, 80, 200, 32), (3, 64, 512, 128)])
def test_int4_small_m_kernel_matches_reference(dtype, m, n, k, group):
    x, qweight, scales, zeros = _int4_problem(torch.Generator().manual_seed(m * n + k), m, n, k, group, dtype)
    ref = int4_matmul_ref(x, qweight, scales, zeros, group)
    for cfg in SMALL_M:
        out = int4_small_m_matmul(x, qweight, scales, zeros, group, config=cfg)
        assert out.shape == (m, n) and out.dtype == dtype
        # SCALE_TILE rounds (q - zero) * scale to x's dtype, as an fp16 / bf16 weight would be
        tol = TOL[dtype] * (2 if cfg.get("SCALE_TILE") else 1)
        assert rel_err(out, ref) < tol, f"{cfg}: {rel_err(out, ref):.2e}"


@pytest.mark.timeout(30)
def test_int4_dispatch_picks_small_m_where_it_won():
    # the configs a CUDA run gets by default on Llama-3-8B's shapes (default_config does not look at the device)
    for n, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
        assert default_config("int4", 1, n, k, 128)["path"] == "gemv"
        for m in range(2, 17):  # swap-AB where the recorded sweep found it faster: the long-k down projection
            cfg = default_config("int4", m, n, k, 128)
            if k >= 2 * n:
                assert cfg["path"] == "small_m" and cfg["BLOCK_N"] >= 64, (m, n, k, cfg)
            else:
                assert cfg["path"] == "gemm", (m, n, k, cfg)
        assert default_config("int4", 17, n, k, 128)["path"] == "gemm"
        assert default_config("int8", 4, n, k)["path"] == "gemm"  # int8 keeps its own paths
    x, qweight, scales, zeros = _int4_problem(torch.Generator().manual_seed(1), 4, 32, 128, 32, torch.float32)
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        int4_small_m_matmul(x, qweight, scales, zeros, 32, config=dict(BLOCK_N=24))
    with pytest.raises(ValueError, match="BLOCK_M must be one of"):
        int4_small_m_matmul(x, qweight, scales, zeros, 32, config=dict(BLOCK_M=8))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [2, 5, 16])
def test_int4_small_m_on_llama_shapes(dtype, m):
    gen = torch.Generator(device="cuda").manual_seed(m)
    w = (torch.randn(4096, 4096, device="cuda", generator=gen) * 0.02).to(dtype)
    x = torch.randn(m, 4096, device="cuda", generator=gen).to(dtype)
    for scheme in ("int4_g32", "int4_g128"):
        qt = quantize_tensor(w, scheme)
        ref = x.float() @ dequantize(qt, torch.float32).T
        for cfg in SMALL_M + [dict(BLOCK_N=128, GROUPS=2, num_warps=8, num_stages=4)]:
            out = int4_small_m_matmul(x, qt.qweight, qt.scales, qt.zeros, qt.scheme.group_size, config=cfg)
            assert rel_err(out, ref) < TOL[dtype] * (2 if cfg.get("SCALE_TILE") else 1), (scheme, cfg)


def test_int4_kernel_group_128_and_strided_x():
    x, qweight, scales, zeros = _int4_problem(torch.Generator().manual_seed(7), 2, 16, 256, 128, torch.float32)
    wide = torch.zeros(2, 300, device=DEVICE)
    wide[:, :256] = x
    xs = wide[:, :256]  # rows 300 apart: the kernel must use the row stride
    out = int4_matmul(xs, qweight, scales, zeros, 128, config=gemv(GROUPS=1))
    assert rel_err(out, int4_matmul_ref(x, qweight, scales, zeros, 128)) < TOL[torch.float32]


def test_kernel_inputs_are_checked():
    x, qweight, scales, zeros = _int4_problem(torch.Generator().manual_seed(0), 1, 8, 64, 32, torch.float32)
    with pytest.raises(ValueError, match="x must be float16"):
        int4_matmul(x.to(torch.int32), qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match="group_size"):
        int4_matmul(x, qweight, scales, zeros, 48)
    with pytest.raises(ValueError, match="k = 32"):
        int4_matmul(x[:, :32], qweight, scales, zeros, 32)
    with pytest.raises(ValueError, match="zeros must be uint8"):
        int4_matmul(x, qweight, scales, zeros.to(torch.int8), 32)
    with pytest.raises(ValueError, match="int8 qweight"):
        int8_matmul(x, qweight, scales[:, 0])
    if ON_GPU:
        with pytest.raises(ValueError, match="is on"):
            int4_matmul(x.cpu(), qweight, scales, zeros, 32)


# ----------------------------------------------------------------------------- modules and checkpoints
class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(64, 96, bias=True)
        self.down_proj = nn.Linear(96, 64)
        self.lm_head = nn.Linear(64, 50, bias=False)

    def forward(self, x):
        return self.lm_head(self.down_proj(torch.relu(self.up_proj(x))))


@pytest.mark.parametrize("scheme", ["int8", "int4_g32"])
def test_quantize_model_swaps_linears_and_stays_close(scheme):
    torch.manual_seed(0)
    model = TinyBlock().to(DEVICE)
    x = torch.randn(2, 3, 64, device=DEVICE)
    ref = model(x)
    quantize_model(model, scheme)
    assert isinstance(model.up_proj, QuantLinear) and isinstance(model.down_proj, QuantLinear)
    assert type(model.lm_head) is nn.Linear, "lm_head is skipped by default"
    out = model(x)
    assert out.shape == ref.shape and rel_err(out, ref) < (0.01 if scheme == "int8" else 0.1)
    if ON_GPU:  # the Triton kernel and the torch reference agree inside a model
        model.up_proj.backend = "torch"
        assert rel_err(model(x), out) < 1e-5


def test_quantize_model_names_layers_it_cannot_group():
    model = TinyBlock()
    with pytest.raises(ValueError, match="down_proj") as e:
        quantize_model(model, "int4_g64")
    assert "pad=True" in str(e.value)
    quantize_model(model, "int4_g64", skip=("lm_head", "down_proj"))
    assert type(model.down_proj) is nn.Linear


def test_quantised_checkpoint_round_trips_and_missing_scales_are_named():
    torch.manual_seed(0)
    model = TinyBlock()
    state = quantize_state_dict(model, "int4_g32")
    assert "up_proj.qweight" in state and "up_proj.weight" not in state and "lm_head.weight" in state
    x = torch.randn(4, 64)
    fresh = load_quantized_state_dict(TinyBlock(), state, "int4_g32")
    assert torch.equal(fresh(x), quantize_model(model, "int4_g32")(x))
    broken = dict(state)
    del broken["down_proj.scales"]
    with pytest.raises(ValueError, match="missing tensor 'down_proj.scales'"):
        load_quantized_state_dict(TinyBlock(), broken, "int4_g32")
    wrong = dict(state)
    wrong["up_proj.zeros"] = wrong["up_proj.zeros"].to(torch.int8)
    with pytest.raises(ValueError, match="up_proj.zeros"):
        load_quantized_state_dict(TinyBlock(), wrong, "int4_g32")


# ----------------------------------------------------------------------------- GPU-only: real sizes
@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_llama_sized_shapes_on_gpu(dtype, m):
    gen = torch.Generator(device="cuda").manual_seed(m)
    w = (torch.randn(1024, 4096, device="cuda", generator=gen) * 0.02).to(dtype)
    x = torch.randn(m, 4096, device="cuda", generator=gen).to(dtype)
    for scheme in SCHEMES:
        qt = quantize_tensor(w, scheme)
        ref = x.float() @ dequantize(qt, torch.float32).T
        if qt.scheme.bits == 8:
            out = int8_matmul(x, qt.qweight, qt.scales)
        elif qt.scheme.float_min:
            out = int4_fmin_matmul(x, qt.qweight, qt.scales, qt.mins, qt.scheme.group_size)
        else:
            out = int4_matmul(x, qt.qweight, qt.scales, qt.zeros, qt.scheme.group_size)
        assert rel_err(out, ref) < TOL[dtype], scheme


@pytest.mark.timeout(60)
def test_bench_rows_name_their_kernel_and_candidates():
    # the benchmark's row names carry the group and the variant; "_gemm" must not be read as a group ("_g")
    from labkit.bench.quant_matmul import INT4_VARIANTS, _int4_name, candidate_configs

    assert _int4_name("labkit_int4_g128") == (128, None)
    for variant in INT4_VARIANTS:
        assert _int4_name(f"labkit_int4_g128_{variant}") == (128, variant)
    assert all(c["path"] == "small_m" for c in candidate_configs("int4", 4, 4096, 4096, 128, "small_m"))
    assert all(c["path"] == "gemm" for c in candidate_configs("int4", 16, 4096, 4096, 128, "gemm"))
    assert candidate_configs("int4", 1, 4096, 4096, 128, "small_m") == []
    assert all(c.get("WORDS") for c in candidate_configs("int8_words", 1, 4096, 4096))


@pytest.mark.timeout(30)
def test_sass_loop_count_reads_both_branch_spellings():
    from labkit.bench.quant_sass import loop_instructions

    by_address = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/                   LDG.E.64 R4, [R2.64] ;
        /*0030*/                   HFMA2 R6, R4, R5, R6 ;
        /*0040*/                   IADD3 R2, R2, 0x8, RZ ;
        /*0050*/               @P0 BRA 0x20 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;
"""
    assert loop_instructions(by_address) == 4  # 0x20..0x50; the final self-branch (1) is smaller
    by_label = """
.L_x_0:
        /*0100*/                   LDG.E R4, [R2.64] ;
        /*0110*/                   FFMA R6, R4, R5, R6 ;
        /*0120*/              @!P1 BRA `(.L_x_0) ;
        /*0130*/                   EXIT ;
"""
    assert loop_instructions(by_label) == 3
    assert loop_instructions("        /*0000*/                   EXIT ;") == 0


@pytest.mark.timeout(30)
def test_quant_profile_reads_ncu_csv_and_pairs_launches():
    from labkit.bench.quant_profile import match, parse_ncu_csv, summarise

    text = "\n".join([
        "==PROF== Connected to process 1",
        '"ID","Kernel Name","gpu__time_duration.sum","dram__bytes_read.sum","dram__bytes_write.sum",'
        '"smsp__inst_executed.sum","smsp__thread_inst_executed_per_inst_executed.ratio",'
        '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",'
        '"smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio"',
        '"","","ns","byte","byte","inst","","inst","inst"',
        '"0","gemv2T_kernel_val","20,000","33,554,432","8,192","1000","32","1.5","0.5"',
        '"1","splitKreduce_kernel","2,000","0","0","10","32","0","0"',
        '"2","elementwise_kernel","1,000","0","0","10","32","0","0"',
        '"3","_int4_gemv_words_kernel","10,000","8,650,752","8,192","4096","32","7.25","2.0"',
    ])
    rows = parse_ncu_csv(text)
    assert [r["Kernel Name"] for r in rows][0] == "gemv2T_kernel_val" and len(rows) == 4
    manifest = [{"kernel": "fp16 cuBLAS", "n": 4096, "k": 4096, "pattern": None},
                {"kernel": "int4 g128 WORDS", "n": 4096, "k": 4096, "pattern": "_int4_gemv_words_kernel"}]
    pairs = match(manifest, rows)
    assert [p[1]["ID"] for p in pairs] == ["0", "3"]
    assert [r["ID"] for r in pairs[0][2]] == ["1", "2"] and pairs[1][2] == []  # cuBLAS keeps what precedes int4
    s = summarise(pairs[1][1], 4096, 4096, copy_gbps=4000.0)
    assert s["kernel_us"] == 10.0 and abs(s["dram_gbps"] - (8650752 + 8192) / 1e4) < 1e-6
    assert abs(s["pct_of_copy"] - 100 * s["dram_gbps"] / 4000) < 1e-9
    assert s["thread_instr_per_weight"] == 4096 * 32 / 4096**2
    assert list(s["stalls"]) == ["long_scoreboard", "lg_throttle"]
    with pytest.raises(RuntimeError, match="no ncu row for int4"):  # a launch missing from the profile
        match(manifest, rows[:3])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k,group", [(1, 24, 256, 128), (2, 13, 300, 64), (1, 40, 4096, 128)])
def test_int4_interleaved_matches_reference(dtype, m, n, k, group):
    # version 3: four rows' words side by side (one x load for four rows); ragged n (13: a partial block of 4),
    # k padded to whole groups, steps that do not divide the groups (EVEN_G off), and on the GPU fp16 x through
    # the PTX block with x broadcast over the rows
    from kernels.quant_matmul_int4_interleaved import deinterleave_int4, int4_matmul_interleaved, interleave_int4

    x, qweight, scales, zeros = _int4_problem(torch.Generator().manual_seed(m + n + k), m, n, k, group, dtype)
    ref = int4_matmul_ref(x, qweight, scales, zeros, group)
    words, s4, z4 = interleave_int4(qweight, scales, zeros)
    assert words.shape == (-(-n // 4), qweight.shape[1] // 4, 4)
    assert all(torch.equal(a, b) for a, b in zip(deinterleave_int4(words, s4, z4, n), (qweight, scales, zeros)))
    for cfg in (None, dict(GROUPS=2), dict(BLOCKS=2, GROUPS=1, PREFETCH=False), dict(GROUPS=32, num_warps=8)):
        out = int4_matmul_interleaved(x, words, s4, z4, n, group, config=cfg)
        assert out.shape == (m, n) and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], f"{cfg}: {rel_err(out, ref):.2e}"


@pytest.mark.timeout(30)
def test_int4_interleaved_refuses_a_plain_layout_and_a_wrong_n():
    from kernels.quant_matmul_int4_interleaved import int4_matmul_interleaved, interleave_int4

    x, qweight, scales, zeros = _int4_problem(torch.Generator().manual_seed(0), 1, 8, 128, 128, torch.float32)
    words, s4, z4 = interleave_int4(qweight, scales, zeros)
    with pytest.raises(ValueError, match="interleave_int4"):
        int4_matmul_interleaved(x, qweight.view(torch.int32), scales, zeros, 8, 128)
    with pytest.raises(ValueError, match="n = 3"):
        int4_matmul_interleaved(x, words, s4, z4, 3, 128)
    with pytest.raises(ValueError, match="scales"):
        int4_matmul_interleaved(x, words, scales, z4, 8, 128)
    with pytest.raises(ValueError, match="k = 256"):
        int4_matmul_interleaved(torch.randn(1, 256, device=x.device), words, s4, z4, 8, 128)


@pytest.mark.timeout(30)
def test_quant_profile_takes_cublas_longest_kernel_as_its_own():
    # cuBLAS at m = 16 runs a split-k GEMM and its reduction, and a split-k labkit launch leaves torch's sum behind
    # it: the cuBLAS entry's own row is the longest of the rows before the next entry's kernel
    from labkit.bench.quant_profile import match

    rows = [{"Kernel Name": name, "gpu__time_duration.sum": ns} for name, ns in
            (("at::reduce_kernel", "1,500"), ("nvjet_splitK_TNT", "30,000"), ("splitKreduce_kernel", "2,000"),
             ("_int8_gemm_kernel", "20,000"))]
    manifest = [{"kernel": "fp16 cuBLAS", "n": 1, "k": 1, "pattern": None},
                {"kernel": "int8 GEMM", "n": 1, "k": 1, "pattern": "_int8_gemm_kernel"}]
    (_, cublas, extras), (_, int8, _) = match(manifest, rows)
    assert cublas["Kernel Name"] == "nvjet_splitK_TNT" and len(extras) == 2
    assert int8["Kernel Name"] == "_int8_gemm_kernel"
