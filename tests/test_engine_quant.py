"""The quantised-engine benchmark (labkit/bench/engine_quant.py) on a tiny model on the CPU, and the CUDA-graph
safety of the quantised layers' forwards. GPU run: ``python -m labkit.bench engine_quant``."""
from __future__ import annotations

import argparse

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import labkit  # noqa: F401  (interpreter mode before kernels import triton)
from labkit.bench import engine_quant
from labkit.bench.engine import make_model
from labkit.engine_quant_figures import speed_figure, speed_sentences
from labkit.quant import QuantLinear, linear_bytes
from labkit.ternary import TernaryLinear

pytestmark = pytest.mark.timeout(180)
# --quick builds the tiny model on the CPU and runs the kernels in Triton's interpreter; on a GPU machine the
# kernels take CUDA tensors only, and the full run (its graph_tokens check) covers what these runs check.
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU smoke run (Triton's interpreter)")


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    engine_quant.add_arguments(parser)
    args = parser.parse_args(["--quick"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


@CPU_ONLY
def test_quick_run_records_every_scheme_and_batch():
    torch.set_num_threads(1)
    result = engine_quant.run(_args(batches="1,4"))
    rows = result["rows"]
    assert sorted((r["scheme"], r["batch"]) for r in rows) == sorted(
        (s, b) for s in engine_quant.SCHEMES for b in (1, 4))
    for scheme, c in result["checks"].items():
        assert c["graph_tokens_match_eager"] and len(c["graph_tokens"]) == engine_quant.GRAPH_TOKENS
        if scheme != "bf16":  # fp32 on the CPU: the kernels equal the dequantised matmul to rounding
            for m in engine_quant.CHECK_SIZES:
                assert c[f"layer_rel_err_max_m{m}"] < 1e-5 and c[f"logits_rel_err_m{m}"] < 1e-5, (scheme, c)
    lin = {r["scheme"]: r["decoder_linears_bytes"] for r in rows if r["batch"] == 1}
    assert lin["ternary"] < lin["int4_g128"] < lin["int8"] < lin["bf16"]
    for r in rows:
        assert r["tok_s"] == pytest.approx(r["batch"] / r["step_ms"] * 1e3)
        assert r["floor_ms"] is None and r["floor_ratio_to_dense"] is None  # no copy bandwidth on the CPU
    assert all(r["ratio_to_dense"] == 1.0 for r in rows if r["scheme"] == "bf16")
    fig = speed_figure(result, "CPU smoke run")
    assert {t.name for t in fig.data} >= set(engine_quant.SCHEMES)
    sentences = speed_sentences(result)
    assert len(sentences) == 3 and all("batch 1" in s and "batch 4" in s for s in sentences)


@CPU_ONLY
def test_a_broken_kernel_stops_the_run(monkeypatch):
    import labkit.quant

    real = labkit.quant.int4_matmul

    def off_by_a_bit(x, qweight, scales, zeros, group_size, **kw):  # every scale read 10% too large
        return real(x, qweight, scales * 1.1, zeros, group_size, **kw)

    monkeypatch.setattr(labkit.quant, "int4_matmul", off_by_a_bit)
    with pytest.raises(RuntimeError, match="int4_g128: the quantised engine is wrong"):
        engine_quant.run(_args(schemes="int4_g128", batches="1"))


@pytest.mark.parametrize("bad, match", [(dict(schemes="bf16,int3"), "int3"), (dict(batches="1,x"), "1,x"),
                                        (dict(batches="0"), "batch"), (dict(lm_head="int5"), "int5")])
def test_bad_options_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        engine_quant.run(_args(**bad))


def test_step_bytes_counts_a_tied_head_once_and_a_quantised_head_alone():
    model = make_model(True, "cpu", torch.float32, engine_quant.QUICK)
    params = sum(p.numel() for p in model.parameters()) * 4  # .parameters() yields a tied weight once
    assert engine_quant.step_bytes(model)["total"] == params
    c = model.config
    engine_quant.apply_scheme(model, "ternary", lm_head="int4_g128", backend="torch")
    got = engine_quant.step_bytes(model)
    assert got["lm_head"] == linear_bytes(c.vocab_size, c.hidden_size, "int4_g128", scale_bytes=4)
    packed = sum(m.packed.numel() + 4 * m.scale.numel() for m in model.modules() if isinstance(m, TernaryLinear))
    assert got["decoder_linears"] == packed


class _HostSyncs(TorchDispatchMode):
    """Records ops that read a tensor's values back to the host or whose output shape depends on them: either
    breaks CUDA-graph capture (the first raises, the second bakes one step's shape into the graph)."""

    BAD = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item")

    def __init__(self):
        super().__init__()
        self.bad: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(b in str(func) for b in self.BAD):
            self.bad.append(str(func))
        return func(*args, **(kwargs or {}))


LAYERS = {"int8": lambda lin, b: QuantLinear.from_linear(lin, "int8", backend=b),
          "int4_g128": lambda lin, b: QuantLinear.from_linear(lin, "int4_g128", backend=b),
          "int4_fmin_g128": lambda lin, b: QuantLinear.from_linear(lin, "int4_fmin_g128", backend=b),
          "ternary": lambda lin, b: TernaryLinear.from_linear(lin, backend=b)}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_quantised_forward_is_graph_capturable(kind, backend):
    """No host sync, and nothing remembered between calls: a replay reads the same input and weight buffers with
    new values in them, so the forward must give what the new values give (here: eager calls on mutated tensors)."""
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("CPU tensors through the interpreter; on the GPU engine_quant's graph_tokens check covers this")
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=False)
    layer = LAYERS[kind](lin, backend)
    reference = LAYERS[kind](lin, "torch")
    x = torch.randn(2, 256)
    with _HostSyncs() as spy:
        layer(x)
    assert spy.bad == [], f"{kind}/{backend} forward syncs with the host: {spy.bad}"
    x.copy_(torch.randn(2, 256))  # same tensor, new values (what a graph replay feeds)
    buffers = dict(layer.named_buffers())
    other = LAYERS[kind](torch.nn.Linear(256, 64, bias=False), "torch")
    for name, t in other.named_buffers():
        buffers[name].copy_(t)  # new weights in the same buffers
        dict(reference.named_buffers())[name].copy_(t)
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
