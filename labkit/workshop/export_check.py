"""Does an executed HTML export draw every figure, offline? ``jupyter nbconvert`` then headless Chromium.

    python -m labkit.workshop.export_check 01 02 05 10      # executes each notebook; about a minute each

For each notebook: what ``jupyter nbconvert --to html --execute`` does (a fresh kernel, ``LABKIT_SOLUTIONS=1``, the default
plotly renderer that ``labkit.setup_notebook`` picks), then the page opens in Chromium with every request that is
not a local file aborted, and the script counts the figures the notebook's outputs hold at top level (plotly
bundles outside widgets) and the ``.plotly-graph-div`` elements that drew an SVG. Figures inside widgets need the
widget manager's JavaScript, which nbconvert's page loads from a CDN; they are listed separately (``make book``
draws them at their default setting). Exit status 1 if any top-level figure did not draw.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from labkit.workshop.timings import NOTEBOOKS, kernel_env, notebook_paths, wake_every_second

CHROMIUM = "/usr/bin/chromium"
PLOTLY = "application/vnd.plotly.v1+json"
WIDGET = "application/vnd.jupyter.widget-view+json"


def count_outputs(nb: dict) -> tuple[int, int]:
    """(plotly figures at top level, widget views) in an executed notebook's outputs."""
    figures = widgets = 0
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            figures += PLOTLY in data
            widgets += WIDGET in data
    return figures, widgets


def export(path: Path, out_dir: Path, timeout: int = 600) -> tuple[Path, dict]:
    """Execute ``path`` in a fresh kernel and export it as nbconvert's HTML: (the .html page, the executed notebook).

    Executed with nbclient, as ``jupyter nbconvert --execute`` does, plus ``wake_every_second`` (INSTRUCTOR.md,
    "stalls": a plain nbconvert run was seen idle here with the kernel's reply already sent).
    """
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    nb = nbformat.read(path, as_version=4)
    env = kernel_env()
    env.pop("PLOTLY_RENDERER", None)  # the renderer a learner gets
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.on_notebook_start = lambda notebook: wake_every_second(client.kc)
    client.execute(env=env)
    body, _ = HTMLExporter().from_notebook_node(nb)
    page = out_dir / f"{path.stem}.html"
    page.write_text(body)
    return page, nb


def drawn_figures(page_path: Path) -> tuple[int, list[str]]:
    """(plotly figures that drew an SVG, the non-file URLs the page asked for) with the network cut off."""
    from playwright.sync_api import sync_playwright

    blocked: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        context = browser.new_context()

        def route(r):
            if r.request.url.startswith(("file:", "data:", "about:", "blob:")):
                r.continue_()
            else:
                blocked.append(r.request.url)
                r.abort()

        context.route("**/*", route)
        page = context.new_page()
        page.goto(page_path.as_uri(), wait_until="load", timeout=120_000)
        page.wait_for_timeout(3000)  # plotly draws after load
        drawn = page.evaluate("""() => [...document.querySelectorAll('.plotly-graph-div')]
                                 .filter(d => d.querySelector('svg.main-svg')).length""")
        browser.close()
    return drawn, blocked


def main(argv: list[str]) -> int:
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for path in notebook_paths(argv or None):
            page, executed = export(path, Path(tmp))
            figures, widgets = count_outputs(executed)
            drawn, blocked = drawn_figures(page)
            ok = drawn >= figures
            failed |= not ok
            print(f"{path.name}: {figures} figure(s) at top level, {drawn} drew an SVG offline "
                  f"({'ok' if ok else 'MISSING FIGURES'}); {widgets} widget(s), which need a running kernel or "
                  f"make book; {len(blocked)} network request(s) blocked "
                  f"({', '.join(sorted({u.split('/')[2] for u in blocked}))})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("LABKIT_SOLUTIONS", "1")
    raise SystemExit(main(sys.argv[1:]))
