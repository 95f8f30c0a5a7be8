"""A figure that redraws whenever one of its controls moves: the one widget pattern the notebooks use.

    view = LiveFigure(make_figure, prompt_len=widgets.IntSlider(...), output_len=widgets.IntSlider(...))
    display(view.widget)          # the controls above the figure
    view.figure                   # the figure drawn for the controls' current values (tests read it)

``make_figure(**values)`` returns a plotly figure for the controls' values; its title should say the values
it was drawn for, so what is printed and what is drawn cannot disagree. Every control's ``value`` is
observed: moving any of them calls ``make_figure`` again with all the current values.
"""
from __future__ import annotations

from typing import Callable


class LiveFigure:
    def __init__(self, make_figure: Callable, **controls):
        import ipywidgets as widgets

        if not controls:
            raise ValueError("LiveFigure needs at least one control (name=widget)")
        self.make_figure, self.controls = make_figure, controls
        self.output = widgets.Output()
        self.figure = None
        self.num_draws = 0
        for w in controls.values():
            w.observe(self._redraw, "value")
        self.widget = widgets.VBox([widgets.HBox(list(controls.values())), self.output])
        self._redraw()

    @property
    def values(self) -> dict:
        return {name: w.value for name, w in self.controls.items()}

    def _redraw(self, *_):
        self.figure = self.make_figure(**self.values)
        self.num_draws += 1
        with self.output:
            self.output.clear_output(wait=True)
            self.figure.show()
