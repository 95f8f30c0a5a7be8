"""What the first cell of every notebook sets up: a fair share of the CPU, and figures that draw everywhere.

    import labkit
    labkit.setup_notebook()
    print(labkit.describe())

``setup_notebook`` caps torch's threads (``labkit.device.limit_threads``: ``LABKIT_THREADS``, default 2) and, inside
a Jupyter kernel, makes plotly emit each figure twice over: as plotly's JSON (JupyterLab draws it with its plotly
extension) and as HTML drawn by plotly.js (what an exported HTML page shows). plotly.js goes into the page once,
in the output of the cell that calls this, so an export draws its figures offline. Plotly's own default in a kernel is the JSON only,
which an HTML export leaves blank. A ``PLOTLY_RENDERER`` set in the environment wins (``make book`` sets it).
"""
from __future__ import annotations

import os

from labkit.device import limit_threads

RENDERER = "plotly_mimetype+notebook"


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def setup_figures() -> str | None:
    """Set plotly's renderer for a notebook (see the module docstring); returns it, or None outside a kernel."""
    if not _in_kernel():
        return None
    if os.environ.get("PLOTLY_RENDERER"):
        return os.environ["PLOTLY_RENDERER"]  # plotly read it at import; make book / slides set it
    from plotly.offline import init_notebook_mode

    # = pio.renderers.default = RENDERER, plus plotly.js written into *this* cell's output now. Left to plotly,
    # plotly.js would go into the first figure's output, which may sit inside a widget that an export cannot draw,
    # and every later figure of the page would find no Plotly.
    init_notebook_mode(connected=False)
    return RENDERER


def setup_notebook(threads: int | None = None) -> int:
    """Limit torch's threads and set up figures; returns the thread count. Call it in a notebook's first cell."""
    n = limit_threads(threads)
    setup_figures()
    return n
