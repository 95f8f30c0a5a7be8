"""Figures and widgets of the notebooks whose concept module would otherwise hold mostly plotting code.

One module per notebook topic (``labkit.figures.batching`` for notebook 03); the memory figures of
notebooks 02 and 04 live beside their accounting in ``labkit.memory_map``. A notebook cell calls one
function and shows the figure; the figures are built (and tested) here once.
"""
