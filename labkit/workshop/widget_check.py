"""Open notebooks in a real JupyterLab in headless Chromium, run them, move every control, check the figure moved.

    python -m labkit.workshop.widget_check 03 11 [--screenshots DIR]   # a few minutes a notebook on 2 cores

What a learner does, done by a browser: JupyterLab serves this checkout on 127.0.0.1 (no token, a free port),
playwright drives Debian's Chromium (``/usr/bin/chromium``) to open each notebook, run all cells and wait for the
kernel. Then, for every ipywidgets control on the page (slider, dropdown, toggle buttons), it records what the
widget's box shows (its text and the shapes of every drawn SVG path), changes the control (a slider's readout is
typed into, a dropdown takes its next option, a toggle its next button), waits, and records again. A control whose
box did not change is reported; the exit status is 1 if any did not, or a notebook failed to run.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from labkit.workshop.timings import ROOT, kernel_env, notebook_paths

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

# Everything a control's box draws, as one string: its text, and each SVG path's geometry.
SIGNATURE_JS = """(el) => {
  const box = el.closest('.jp-OutputArea-output') || el.closest('.jp-Cell');
  const paths = Array.from(box.querySelectorAll('svg path')).map(p => p.getAttribute('d') || '').join('|');
  return (box.textContent || '') + '#' + paths;
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyterlab():
    """A JupyterLab server over this checkout on 127.0.0.1, stopped on exit; yields its base URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={ROOT}",
           "--ServerApp.disable_check_xsrf=True"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, env=kernel_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.5)
        else:
            raise RuntimeError("JupyterLab did not start within 60 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _run_all(page, timeout_s: float) -> None:
    page.wait_for_selector(".jp-Notebook", timeout=60_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], #jp-main-statusbar", timeout=60_000)
    time.sleep(3)  # the kernel starts
    page.click("div.lm-MenuBar-itemLabel:text-is('Run')")
    page.click("li.lm-Menu-item:has-text('Run All Cells')")
    deadline = time.monotonic() + timeout_s
    time.sleep(3)
    while time.monotonic() < deadline:
        busy = page.locator(".jp-InputPrompt:has-text('[*]')").count()
        if busy == 0:
            return
        time.sleep(1)
    raise TimeoutError(f"cells still running after {timeout_s:.0f} s")


def _controls(page):
    """(kind, locator) of every control on the page."""
    found = []
    for i in range(page.locator(".widget-slider .widget-readout").count()):
        found.append(("slider", page.locator(".widget-slider .widget-readout").nth(i)))
    for i in range(page.locator(".widget-dropdown select").count()):
        found.append(("dropdown", page.locator(".widget-dropdown select").nth(i)))
    for i in range(page.locator(".widget-toggle-buttons").count()):
        found.append(("toggle", page.locator(".widget-toggle-buttons").nth(i)))
    return found


def _move(page, kind: str, control) -> str:
    """Change the control; returns what was done."""
    if kind == "slider":
        before = control.inner_text().strip()
        slider = control.locator("xpath=ancestor::div[contains(@class,'widget-slider')][1]")
        handle = slider.locator(".noUi-handle").first
        handle.focus()
        for _ in range(3):
            page.keyboard.press("ArrowRight")
        page.keyboard.press("Enter")
        time.sleep(0.3)
        after = control.inner_text().strip()
        if after == before:  # at the right end already: move left instead
            handle.focus()
            for _ in range(3):
                page.keyboard.press("ArrowLeft")
            after = control.inner_text().strip()
        return f"slider {before} -> {after}"
    if kind == "dropdown":
        options = control.locator("option").all_inner_texts()
        current = control.evaluate("(s) => s.selectedIndex")
        target = (current + 1) % max(1, len(options))
        control.select_option(index=target)
        return f"dropdown -> {options[target] if options else '?'}"
    buttons = control.locator("button")
    n = buttons.count()
    active = next((i for i in range(n) if "mod-active" in (buttons.nth(i).get_attribute("class") or "")), 0)
    target = (active + 1) % max(1, n)
    buttons.nth(target).click()
    return f"toggle -> {buttons.nth(target).inner_text()}"


def check_notebook(page, base: str, path: Path, timeout_s: float = 300, shots: Path | None = None) -> list[str]:
    """Problems found in one notebook ([] when every control changed what its box draws)."""
    rel = path.relative_to(ROOT).as_posix()
    page.goto(f"{base}/lab/tree/{rel}?reset", wait_until="domcontentloaded")
    try:
        _run_all(page, timeout_s)
    except Exception as exc:  # reported: the notebook did not run to the end in the browser
        return [f"{path.name}: did not finish running ({exc})"]
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']:has-text('Error')")
    problems = [f"{path.name}: an error is shown: {errors.first.inner_text()[:200]}"] if errors.count() else []
    controls = _controls(page)
    print(f"{path.name}: {len(controls)} control(s)", flush=True)
    for kind, control in controls:
        control.scroll_into_view_if_needed()
        before = control.evaluate(SIGNATURE_JS)
        what = _move(page, kind, control)
        changed = False
        for _ in range(40):  # up to 20 s: a redraw can rerun a simulation
            time.sleep(0.5)
            if control.evaluate(SIGNATURE_JS) != before:
                changed = True
                break
        print(f"  {what}: {'figure changed' if changed else 'NOTHING CHANGED'}", flush=True)
        if not changed:
            problems.append(f"{path.name}: {what} changed nothing")
        if shots is not None:
            control.locator("xpath=ancestor::div[contains(@class,'jp-Cell')][1]").screenshot(
                path=str(shots / f"{path.stem}-{kind}-{controls.index((kind, control))}.png"))
    return problems


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    argv = sys.argv[1:] if argv is None else argv
    shots = None
    if "--screenshots" in argv:  # --screenshots DIR: each control's cell, after it moved
        i = argv.index("--screenshots")
        shots = Path(argv[i + 1])
        shots.mkdir(parents=True, exist_ok=True)
        argv = argv[:i] + argv[i + 2:]
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing: `apt-get install chromium` (Debian's browser; playwright's download fails here)")
        return 2
    problems = []
    with jupyterlab() as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for path in notebook_paths(argv or None):
            problems += check_notebook(page, base, path, shots=shots)
        browser.close()
    print("\n".join(problems) if problems else "every control changed its figure")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
