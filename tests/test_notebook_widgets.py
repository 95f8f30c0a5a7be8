"""Every widget of notebooks 01, 02, 05 and 10 redraws when any of its controls moves, and what it draws changes.

A browser is not needed for this: each explorer keeps what it drew last (``figure``, or ``text`` for 01's sampler),
and moving a control fires the same observers a browser would. ~10 s in all.
"""
import json

import plotly.io as pio
import pytest

from labkit import bench
from labkit.checkpoint import load_default_model

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_default_model()


def _other_value(control):
    """A value of ``control`` different from its current one (options, or a step along its range)."""
    if hasattr(control, "options") and control.options:
        values = [o[1] if isinstance(o, tuple) else o for o in control.options]
        return next(v for v in values if v != control.value)
    step = getattr(control, "step", 1) or 1
    return control.value + step if control.value + step <= control.max else control.value - step


def _figure_json(fig) -> str:
    return json.dumps(json.loads(pio.to_json(fig))["data"], sort_keys=True)


def _moves_every_control(explorer, snapshot):
    explorer.update()
    for control in explorer.controls:
        before = snapshot(explorer)
        control.value = _other_value(control)  # observers redraw, as a browser's change would
        after = snapshot(explorer)
        assert after != before, f"moving {control.description!r} to {control.value!r} did not change the output"


def test_sampling_explorer_regenerates_on_every_control(model_and_tokenizer):
    from labkit.sampling_explorer import SamplingExplorer

    model, tokenizer = model_and_tokenizer
    explorer = SamplingExplorer(model, tokenizer, "It is a truth universally acknowledged, that", max_new_tokens=12)
    explorer.top_k.value = 0  # off, so that a temperature or top_p step changes the distribution sampled
    explorer.temperature.value = 1.5
    # The sample is text: a step of one control can leave 12 sampled tokens the same by chance, so each control
    # gets a few tries, and the label (which names every setting) must change on every move.
    for control in explorer.controls:
        explorer.temperature.value, explorer.top_k.value, explorer.top_p.value = 1.5, 0, 1.0
        texts = {explorer.text}
        for value in (control.min, control.max, (control.min + control.max) / 2, control.min + control.step):
            control.value = type(control.value)(value)
            texts.add(explorer.text)
        assert len(texts) > 1, f"{control.description} never changed the sample"


def test_bandwidth_explorer_redraws_per_dtype():
    from labkit.paged_attention_figures import BandwidthExplorer

    _moves_every_control(BandwidthExplorer(bench.load("paged_attention"), "recorded"), lambda e: _figure_json(e.figure))


def test_weight_histogram_explorer_redraws_per_layer_and_linear(model_and_tokenizer):
    from labkit.ternary_figures import WeightHistogramExplorer

    explorer = WeightHistogramExplorer(model_and_tokenizer[0])
    _moves_every_control(explorer, lambda e: _figure_json(e.figure))
    # the widget keeps labkit's function even after a notebook cell defines its own absmean_ternarise
    import labkit.ternary_figures as tf
    from labkit.ternary import absmean_ternarise

    assert tf.absmean_ternarise is absmean_ternarise


def test_memory_map_explorer_redraws_on_every_control(monkeypatch):
    import labkit.memory_map as mm

    drawn = []
    real = mm.memory_map_figure
    monkeypatch.setattr(mm, "memory_map_figure", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    explorer = mm.MemoryMapExplorer("sharegpt")
    # With no client cap, "reserve prompt + max_new_tokens" reserves max_len: the same map, under another title.
    explorer.cap.value = "512"
    explorer.controls = (explorer.policy, explorer.max_len, explorer.cap, explorer.color_by, explorer.step)
    _moves_every_control(explorer, lambda e: _figure_json(drawn[-1]) if drawn else "")
