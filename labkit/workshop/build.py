"""``make slides`` and ``make book``: offline HTML from the executed notebooks.

    python -m labkit.workshop.build slides [NN ...]   # build/slides/NN_name.slides.html, reveal.js decks
    python -m labkit.workshop.build book [NN ...]     # build/book/index.html + one page per notebook

Both execute each notebook once in a fresh kernel (cached in build/executed/, keyed by a hash of the notebook,
the package and data/bench; ``--force`` runs them again) and then make every output static and self-contained:

- a plotly figure (``application/vnd.plotly.v1+json``, the lab's default renderer, which an HTML export leaves
  blank) becomes a ``<div>`` drawn by plotly.js; plotly.js itself is loaded once per page from ``vendor/``
  (the copy inside the installed plotly package, so it always matches the figures' schema);
- a widget (sliders, dropdowns) needs a live kernel to recompute, so it becomes a note naming its controls,
  followed by what its Output areas showed at the default setting (figures included);
- the decks load reveal.js and its notes plugin from ``vendor/reveal.js`` (npm's ``reveal.js`` tarball, fetched
  once with ``npm pack`` and checked against a pinned sha512), never from a CDN. Press ``s`` in a deck for the
  speaker view with the presenter notes (cells starting ``Notes:``, see ``labkit.workshop.slides``).

Nothing in the output refers to the network; tests/test_workshop_browser.py opens the pages in Chromium with
every non-file request blocked.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

from labkit.workshop.timings import NOTEBOOKS, ROOT, kernel_env, notebook_paths, wake_every_second

BUILD = ROOT / "build"
EXECUTED = BUILD / "executed"
TEMPLATES = Path(__file__).parent / "templates"

# reveal.js from the npm registry: pinned version and the registry's integrity hash for its tarball.
REVEAL_VERSION = "4.6.1"
REVEAL_INTEGRITY = "sha512-1CW0auaXNPmwmvQ7TwpszwVxMi2Xr5cTS3J3EBC/HHgbPF32Dn7aiu/LKWDOGjMbaDwKQiGmfqcoGQ74HUHCMw=="
REVEAL_TARBALL = BUILD / "vendor" / f"reveal.js-{REVEAL_VERSION}.tgz"
# The files a deck needs (the tarball also holds sources, demos and other plugins).
REVEAL_FILES = ("LICENSE", "dist/reveal.js", "dist/reveal.css", "dist/theme/white.css",
                "dist/theme/fonts/source-sans-pro/", "plugin/notes/notes.js")

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
PLOTLY = "application/vnd.plotly.v1+json"


# ---------------------------------------------------------------------------------------------- vendored files
def reveal_tarball() -> Path:
    """npm's reveal.js tarball, fetched with ``npm pack`` on first use and verified against REVEAL_INTEGRITY."""
    if not REVEAL_TARBALL.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(f"make slides needs reveal.js {REVEAL_VERSION}: install npm (Debian: apt-get install "
                               f"npm) or put reveal.js-{REVEAL_VERSION}.tgz from the npm registry in "
                               f"{REVEAL_TARBALL.parent}")
        REVEAL_TARBALL.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "pack", "--silent", f"reveal.js@{REVEAL_VERSION}"], cwd=REVEAL_TARBALL.parent,
                       check=True, stdout=subprocess.DEVNULL)
    digest = "sha512-" + base64.b64encode(hashlib.sha512(REVEAL_TARBALL.read_bytes()).digest()).decode()
    if digest != REVEAL_INTEGRITY:
        raise RuntimeError(f"{REVEAL_TARBALL} has {digest}, not the pinned {REVEAL_INTEGRITY}: delete it and "
                           "run make slides again (or update REVEAL_VERSION and REVEAL_INTEGRITY together)")
    return REVEAL_TARBALL


def plotly_js() -> Path:
    """plotly.min.js as shipped inside the installed plotly package (the version its figures are written for)."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise RuntimeError(f"no {path}: this plotly install does not ship plotly.js; reinstall plotly")
    return path


def vendor(out: Path, reveal: bool) -> None:
    """Copy plotly.js (and, for decks, the reveal.js files) to ``out/vendor``."""
    dest = out / "vendor"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plotly_js(), dest / "plotly.min.js")
    if reveal:
        with tarfile.open(reveal_tarball()) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and any(
                m.name == f"package/{f}" or (f.endswith("/") and m.name.startswith(f"package/{f}"))
                for f in REVEAL_FILES)]
            for m in members:
                target = dest / "reveal.js" / m.name.removeprefix("package/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(m).read())


# ---------------------------------------------------------------------------------------------- execution
def source_key(path: Path) -> str:
    """A hash of what an executed notebook depends on: itself, the package, the kernels and recorded data."""
    h = hashlib.sha256(path.read_bytes())
    deps = [*ROOT.glob("labkit/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("data/bench/*.json")]
    deps = sorted(p for p in deps if "workshop" not in p.relative_to(ROOT).parts)  # the builder is not an input
    for dep in deps:
        h.update(dep.relative_to(ROOT).as_posix().encode())
        h.update(dep.read_bytes())
    return h.hexdigest()


def execute(path: Path, force: bool = False, timeout: int = 600):
    """The notebook at ``path``, executed in a fresh kernel in notebooks/ (cached in build/executed/)."""
    import nbformat
    from nbclient import NotebookClient

    cached = EXECUTED / path.name
    key = source_key(path)
    if cached.exists() and not force:
        nb = nbformat.read(cached, as_version=4)
        if nb.metadata.get("labkit_build", {}).get("source_key") == key:
            return nb
    nb = nbformat.read(path, as_version=4)
    print(f"executing {path.name}", flush=True)
    env = kernel_env()
    env["PLOTLY_RENDERER"] = "plotly_mimetype"  # figures as JSON; staticise() draws them
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.on_notebook_start = lambda notebook: wake_every_second(client.kc)
    client.execute(env=env)
    nb.metadata["labkit_build"] = {"source_key": key}
    EXECUTED.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, cached)
    return nb


# ---------------------------------------------------------------------------------------------- static outputs
def _plotly_html(fig: dict) -> str:
    import plotly.io as pio

    height = fig.get("layout", {}).get("height")
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, validate=False,
                       default_width="100%", default_height=f"{height}px" if height else "450px",
                       config={"displaylogo": False, "responsive": True})


def _widget_outputs(state: dict, model_id: str) -> tuple[list[str], list[dict]]:
    """(controls as 'description: value', outputs shown) of the widget tree under ``model_id``."""
    controls, outputs = [], []
    model = state.get(model_id)
    if model is None:
        return controls, outputs
    s = model.get("state", {})
    if model.get("model_name") == "OutputModel":
        outputs.extend(s.get("outputs", []))
    elif s.get("description") is not None and "value" in s:
        value = s["value"]
        if "_options_labels" in s and isinstance(s.get("index"), int):
            value = s["_options_labels"][s["index"]]
        controls.append(f"{s['description'] or model.get('model_name', '').removesuffix('Model')}: {value}")
    for child in s.get("children", []):
        c, o = _widget_outputs(state, child.removeprefix("IPY_MODEL_"))
        controls += c
        outputs += o
    return controls, outputs


def staticise(nb, drop_notes: bool = False):
    """Make every output of ``nb`` render in a static page (see the module docstring). Returns ``nb``."""
    from nbformat import from_dict

    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    cells = []
    for cell in nb.cells:
        if drop_notes and cell.metadata.get("slideshow", {}).get("slide_type") == "notes":
            continue
        if cell.cell_type == "code":
            outputs = []
            for out in cell.outputs:
                view = out.get("data", {}).get(WIDGET_VIEW)
                if view is None:
                    outputs.append(out)
                    continue
                controls, shown = _widget_outputs(state, view["model_id"])
                note = ("Interactive in JupyterLab" + (f" (controls: {', '.join(controls)})" if controls else "")
                        + ": the controls need a running kernel. Shown here: the default setting.")
                outputs.append(from_dict({"output_type": "display_data", "metadata": {},
                                          "data": {"text/html": f'<p class="labkit-widget-note">'
                                                                f'{html.escape(note)}</p>'}}))
                outputs.extend(from_dict(o) for o in shown)
            for out in outputs:
                data = out.get("data", {})
                if PLOTLY in data:
                    out["data"] = {"text/html": _plotly_html(data[PLOTLY])}
            cell.outputs = outputs
        cells.append(cell)
    nb.cells = cells
    nb.metadata.pop("widgets", None)
    return nb


# ---------------------------------------------------------------------------------------------- the two builds
def _title_and_objectives(nb) -> tuple[str, str]:
    """The notebook's '# ' title and its 'In this notebook you will' list, as (text, markdown)."""
    first = next((c.source for c in nb.cells if c.cell_type == "markdown"), "")
    m = re.search(r"^# (.+)$", first, flags=re.MULTILINE)
    title = m.group(1).strip() if m else ""
    m = re.search(r"In this notebook you will\**\s*\n((?:[-*] .*\n?|  +.*\n?)+)", first)
    return title, (m.group(1) if m else "")


def _markdown(text: str) -> str:
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    return markdown2html_mistune(text)


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            '<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em;line-height:1.45}'
            'h2{margin-top:1.6em} li{margin:.2em 0}</style></head>\n'
            f'<body>\n{body}\n</body></html>\n')


def build_slides(paths: list[Path], out: Path, force: bool = False, timeout: int = 600) -> list[Path]:
    from nbconvert import SlidesExporter

    from labkit.workshop.slides import tag

    vendor(out, reveal=True)
    exporter = SlidesExporter(extra_template_basedirs=[str(TEMPLATES)], template_name="labkit_reveal",
                              reveal_url_prefix="vendor/reveal.js", reveal_theme="white",
                              reveal_number="c/t", reveal_width="1280", reveal_height="800")
    written, entries = [], []
    for path in paths:
        nb = staticise(execute(path, force, timeout))
        tag(nb)  # a notebook not yet tagged in the repository still gets a deck by the same rules
        title, _ = _title_and_objectives(nb)
        body, _ = exporter.from_notebook_node(nb, resources={"labkit": {"vendor": "vendor"}})
        target = out / f"{path.stem}.slides.html"
        target.write_text(body)
        written.append(target)
        entries.append(f'<li><a href="{target.name}">{html.escape(title or path.stem)}</a></li>')
        print(f"wrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
    (out / "index.html").write_text(_page("labkit slides", "<h1>labkit: slides</h1>\n<p>Arrow keys move; "
                                          "<kbd>s</kbd> opens the speaker view with the presenter notes; "
                                          "<kbd>Esc</kbd> shows every slide.</p>\n<ul>"
                                          + "\n".join(entries) + "</ul>"))
    return written


def build_book(paths: list[Path], out: Path, force: bool = False, timeout: int = 600) -> list[Path]:
    from nbconvert import HTMLExporter

    vendor(out, reveal=False)
    exporter = HTMLExporter(extra_template_basedirs=[str(TEMPLATES)], template_name="labkit_book")
    written, sections = [], []
    names = [f"{p.stem}.html" for p in paths]
    for i, path in enumerate(paths):
        nb = staticise(execute(path, force, timeout), drop_notes=True)
        title, objectives = _title_and_objectives(nb)
        links = ['<a href="index.html">&#8962; contents</a>']
        if i > 0:
            links.append(f'<a href="{names[i - 1]}">&larr; {html.escape(paths[i - 1].stem)}</a>')
        if i + 1 < len(paths):
            links.append(f'<a href="{names[i + 1]}">{html.escape(paths[i + 1].stem)} &rarr;</a>')
        nav = f'<nav class="labkit-nav">{" ".join(links)}</nav>'
        nb.metadata["title"] = title or path.stem
        body, _ = exporter.from_notebook_node(nb, resources={"labkit": {"vendor": "vendor", "nav": nav}})
        target = out / names[i]
        target.write_text(body)
        written.append(target)
        sections.append(f'<h2><a href="{names[i]}">{html.escape(title or path.stem)}</a></h2>\n'
                        f'<p>In this notebook you will</p>\n{_markdown(objectives)}')
        print(f"wrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
    intro = ("<h1>labkit: how LLMs are served, one layer at a time</h1>\n<p>The notebooks, executed on a CPU "
             "without a GPU (speed figures are replotted from GPU recordings). Figures are interactive; widgets "
             "show their default setting: run the notebooks in JupyterLab (<code>make lab</code>) to move them.</p>")
    (out / "index.html").write_text(_page("labkit", intro + "\n" + "\n".join(sections)))
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["slides", "book"])
    ap.add_argument("notebooks", nargs="*", help="two-digit prefixes (default: all)")
    ap.add_argument("--out", type=Path, help="output folder (default: build/slides or build/book)")
    ap.add_argument("--force", action="store_true", help="execute again even if build/executed is current")
    args = ap.parse_args(argv)
    paths = notebook_paths(args.notebooks)
    out = args.out or BUILD / args.what
    out.mkdir(parents=True, exist_ok=True)
    (build_slides if args.what == "slides" else build_book)(paths, out, args.force)


if __name__ == "__main__":
    main()
