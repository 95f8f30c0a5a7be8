"""Notebooks 06, 07 and 09: every control redraws its figure, and the figure shows the control's exact value."""
from __future__ import annotations

import pytest

import labkit  # noqa: F401
from labkit.config import LlamaConfig

pytestmark = pytest.mark.timeout(180)


def test_sampling_sliders_keep_161_and_redraw():
    from labkit.prefix_sharing import sampling_widget

    view = sampling_widget(prompt_len=161, output_len=338)
    assert view.controls["prompt_len"].value == 161 and "prompt 161, answers 338" in view.figure.layout.title.text
    before = list(view.figure.data[1].y)
    view.controls["prompt_len"].value = 1000
    assert view.num_draws == 2 and "prompt 1000" in view.figure.layout.title.text
    assert list(view.figure.data[1].y) != before
    view.controls["output_len"].value = 17
    assert view.num_draws == 3 and "answers 17" in view.figure.layout.title.text


def test_capacity_slider_value_is_the_value_drawn():
    from labkit.kv_quant import max_concurrent_sequences
    from labkit.kv_quant_figures import capacity_widget

    cfg = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, hidden_size=4096,
                      head_dim=128, intermediate_size=14336, vocab_size=128256)
    view = capacity_widget({"Llama-3-8B": cfg}, "Llama-3-8B", pool_gib=40, seq_len=4096)
    assert view.controls["pool_gib"].value == 40
    bars = dict(zip(view.figure.data[0].x, view.figure.data[0].y))
    assert bars["int8"] == max_concurrent_sequences(cfg, 40 * 2**30, 4096, "int8")
    view.controls["pool_gib"].value = 8
    bars8 = dict(zip(view.figure.data[0].x, view.figure.data[0].y))
    assert bars8["fp16"] == max_concurrent_sequences(cfg, 8 * 2**30, 4096, "fp16") and "8 GiB" in view.figure.layout.title.text


def test_preemption_sliders_redraw_the_figure():
    from labkit.preemption_figures import policy_widget

    view = policy_widget(num_blocks=128, swap_gbps=8.0)
    marker = view.figure.data[-1].y[0]  # swap throughput at the chosen (pool, bandwidth)
    view.controls["swap_gbps"].value = 0.1
    assert view.num_draws == 2 and "0.1 GB/s" in view.figure.layout.title.text
    assert view.figure.data[-1].y[0] < marker  # a slower link: swap gets slower
    view.controls["num_blocks"].value = 384
    assert view.num_draws == 3 and "pool 384 blocks" in view.figure.layout.title.text
