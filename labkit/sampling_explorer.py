"""Notebook 01's sampling widget: temperature, top-k, top-p and a seed over the same prompt.

    explorer = SamplingExplorer(model, tokenizer, "It is a truth universally acknowledged, that")
    display(explorer.widget)      # every change of a control generates again and shows the text

``explorer.text`` is the last sample shown (what a test reads); ``update()`` draws once without a browser.
Temperature 0 is greedy decoding, whatever top_k and top_p say.
"""
from __future__ import annotations

from labkit.generate import generate


class SamplingExplorer:
    def __init__(self, model, tokenizer, prompt: str, max_new_tokens: int = 30):
        import ipywidgets as W

        self.model, self.tokenizer, self.prompt = model, tokenizer, prompt
        self.prompt_ids = tokenizer.encode(prompt)
        self.max_new_tokens = max_new_tokens
        self.temperature = W.FloatSlider(value=0.8, min=0.0, max=2.0, step=0.1, description="temperature",
                                         continuous_update=False)
        self.top_k = W.IntSlider(value=40, min=0, max=200, description="top_k", continuous_update=False,
                                 tooltip="0: off")
        self.top_p = W.FloatSlider(value=0.95, min=0.1, max=1.0, step=0.05, description="top_p",
                                   continuous_update=False)
        self.seed = W.IntSlider(value=0, min=0, max=20, description="seed", continuous_update=False)
        self.out = W.Output()
        self.text = ""
        for w in self.controls:
            w.observe(lambda _change: self.update(), names="value")
        self.widget = W.VBox([W.HBox([self.temperature, self.top_k]), W.HBox([self.top_p, self.seed]), self.out])

    @property
    def controls(self):
        return (self.temperature, self.top_k, self.top_p, self.seed)

    def sample(self) -> str:
        out = generate(self.model, self.prompt_ids, self.max_new_tokens, temperature=self.temperature.value,
                       top_k=self.top_k.value, top_p=self.top_p.value, seed=self.seed.value)
        return self.prompt + self.tokenizer.decode(out.token_ids)

    def update(self) -> None:
        self.text = self.sample()
        label = (f"temperature {self.temperature.value:.1f} (0 = greedy), top_k {self.top_k.value} (0 = off), "
                 f"top_p {self.top_p.value:.2f}, seed {self.seed.value}")
        self.out.clear_output(wait=True)
        with self.out:
            print(label)
            print(self.text)
