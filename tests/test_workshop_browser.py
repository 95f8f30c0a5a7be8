"""make slides and make book, opened in headless Chromium with the network cut off.

Builds decks and book pages for two small notebooks only (00 and 02), into a temporary folder, so the whole
module costs about half a minute after the two notebooks have run once. Needs Debian's chromium
(``apt-get install chromium``; .ci/run installs it) and the ``playwright`` package; skips, saying which is
missing, otherwise. Playwright's own browser download is not used.
"""
import base64
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from labkit.workshop import build, timings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
# Per cell. 00's and 02's cells take seconds; under load the headless client has been seen to sit idle until
# its per-cell timeout before it read a reply that had arrived (notebooks/INSTRUCTOR.md, "stalls"), so a
# short timeout bounds what such a stall costs here.
CELL_TIMEOUT_S = 120

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()), None)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
NOTEBOOKS = ["00", "02"]

if CHROMIUM is None:
    pytest.skip("no Chromium at /usr/bin/chromium: apt-get install -y chromium (Debian) to run the browser tests",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra) for the "
                                                             "browser tests")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """{'slides': folder, 'book': folder} built from notebooks 00 and 02."""
    if not build.REVEAL_TARBALL.exists() and shutil.which("npm") is None:
        pytest.skip(f"make slides needs reveal.js: no npm to fetch it and no {build.REVEAL_TARBALL}")
    root = tmp_path_factory.mktemp("site")
    paths = timings.notebook_paths(NOTEBOOKS)
    build.build_slides(paths, root / "slides", timeout=CELL_TIMEOUT_S)
    build.build_book(paths, root / "book", timeout=CELL_TIMEOUT_S)
    return {"slides": root / "slides", "book": root / "book"}


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A page that may load file:// URLs only; every other request is aborted and listed in page.blocked."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = context.new_page()
    pg.blocked, pg.errors = [], []

    def route(r):
        if r.request.url.startswith(("file:", "data:", "about:", "blob:")):
            r.continue_()
        else:
            pg.blocked.append(r.request.url)
            r.abort()

    context.route("**/*", route)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("requestfailed", lambda r: pg.errors.append(f"failed: {r.url}"))
    yield pg
    context.close()


def ink(page, png: bytes) -> float:
    """Share of the screenshot's pixels that differ clearly from its most common colour (0: blank)."""
    return page.evaluate("""async (b64) => {
        const img = new Image(); img.src = 'data:image/png;base64,' + b64; await img.decode();
        const c = document.createElement('canvas'); c.width = img.width; c.height = img.height;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data, counts = new Map();
        for (let i = 0; i < d.length; i += 4) { const k = (d[i] << 16) | (d[i+1] << 8) | d[i+2];
                                              counts.set(k, (counts.get(k) || 0) + 1); }
        let bg = 0, best = 0; for (const [k, n] of counts) if (n > best) { best = n; bg = k; }
        const br = bg >> 16, bgc = (bg >> 8) & 255, bb = bg & 255; let differ = 0;
        for (let i = 0; i < d.length; i += 4)
          if (Math.abs(d[i]-br) + Math.abs(d[i+1]-bgc) + Math.abs(d[i+2]-bb) > 60) differ++;
        return differ / (d.length / 4); }""", base64.b64encode(png).decode())


def local_links(html_text: str, folder: Path) -> list[Path]:
    """Every href/src of the page that points at a local file (anchors and data: URLs left out)."""
    out = []
    for url in re.findall(r'(?:href|src)="([^"#][^"]*)"', html_text):
        parsed = urlparse(url)
        if parsed.scheme in ("", "file"):
            out.append((folder / unquote(parsed.path)).resolve())
    return out


def test_deck_shows_a_title_slide_and_a_figure_slide(site, page, tmp_path):
    deck = site["slides"] / "02_kv_cache.slides.html"
    page.goto(deck.as_uri())
    page.wait_for_function("window.Reveal && Reveal.isReady()")
    title = page.locator(".reveal .slides section.present h1").first
    assert "02" in title.text_content() and "KV cache" in title.text_content()
    shot = page.screenshot(path=tmp_path / "title.png")
    assert ink(page, shot) > 0.01, "the title slide's screenshot is blank"

    # The first slide with a plotly figure: go there, and the figure must have drawn its SVG.
    h, v = page.evaluate("""() => { for (const s of Reveal.getSlides()) {
        if (s.querySelector('.plotly-graph-div')) { const i = Reveal.getIndices(s); return [i.h, i.v || 0]; } }
        return null; }""")
    page.evaluate(f"Reveal.slide({h}, {v})")
    page.wait_for_selector(".reveal section.present .plotly-graph-div .main-svg", timeout=20_000)
    assert page.locator(".reveal section.present .plotly-graph-div .main-svg .scatterlayer, "
                        ".reveal section.present .plotly-graph-div .main-svg .barlayer").count() > 0
    shot = page.screenshot(path=tmp_path / "figure.png")
    assert ink(page, shot) > 0.02, "the figure slide's screenshot is blank"
    assert page.blocked == [] and page.errors == []


def test_deck_has_presenter_notes_and_a_speaker_view(site, page):
    page.goto((site["slides"] / "02_kv_cache.slides.html").as_uri())
    page.wait_for_function("window.Reveal && Reveal.isReady()")
    assert page.locator("aside.notes").count() >= 1
    assert "Recap 01" in page.locator("aside.notes").first.inner_text()
    with page.expect_popup() as popup:
        page.keyboard.press("s")
    speaker = popup.value
    speaker.wait_for_selector(".speaker-controls-notes", timeout=10_000)
    speaker.wait_for_function("document.querySelector('.speaker-controls-notes').innerText.includes('Recap')",
                              timeout=10_000)
    assert page.blocked == []


def test_book_index_and_a_page_load_offline(site, page):
    index = site["book"] / "index.html"
    page.goto(index.as_uri())
    assert "In this notebook you will" in page.content()
    assert page.locator("a[href='02_kv_cache.html']").count() == 1
    for target in local_links(index.read_text(), index.parent):
        assert target.exists(), f"index.html links to missing {target}"

    nb_page = site["book"] / "02_kv_cache.html"
    page.goto(nb_page.as_uri())
    page.wait_for_selector(".plotly-graph-div .main-svg", timeout=20_000)
    assert page.locator(".plotly-graph-div .main-svg").count() >= 3
    assert page.locator(".labkit-widget-note").count() >= 1  # the memory-map explorer, at its default setting
    assert "Notes:" not in page.inner_text("body")  # presenter notes stay out of the handout
    for target in local_links(nb_page.read_text(), nb_page.parent):
        assert target.exists(), f"02_kv_cache.html links to missing {target}"
    assert page.blocked == [] and page.errors == []


def test_slides_index_links_every_deck(site):
    index = site["slides"] / "index.html"
    links = local_links(index.read_text(), index.parent)
    assert {p.name for p in links} == {"00_setup_and_tour.slides.html", "02_kv_cache.slides.html"}
    assert all(p.exists() for p in links)
