"""`sketchwalk screenshots SWEEP_ID`: the MLflow UI pages of a sweep, rendered by headless Chromium
(driven by Playwright, so the parent run's row can be expanded and the assistant panel closed).

What a reader of a sweep's results sees without running anything: the experiment's runs table (the
parent run with its child trials), the parent run (its params, tags and the front plot among its
artifacts), the front plot itself as the UI shows it, and one finished trial's metrics. For a
SQLite store a throwaway `mlflow server` is started on a free loopback port and stopped after; an
http(s) store is used as it is. Each page becomes a PNG; `screenshots.json` lists the pages, their
URLs and a check that the picture is not blank (the count of distinct colours).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

from tracking.names import ROLE_SWEEP, TAG_ROLE

from .session import SweepSession

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MIN_COLOURS = 16  # a rendered page has text and widgets; a blank or error page has a handful


class ScreenshotError(RuntimeError):
    """A screenshot run that cannot work here (no browser, the server did not start)."""


def find_browser() -> str:
    """The Chromium-family browser on PATH (SKETCHWALK_CHROMIUM overrides); ScreenshotError otherwise."""
    override = os.environ.get("SKETCHWALK_CHROMIUM")
    for name in ([override] if override else []) + list(BROWSERS):
        path = shutil.which(name)
        if path:
            return path
    raise ScreenshotError("no Chromium found (install Debian's `chromium`, or set SKETCHWALK_CHROMIUM to its path)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(tracking_uri: str, timeout_s: float = 90.0) -> Iterator[str]:
    """The base URL of an MLflow UI showing `tracking_uri`: the server itself for http(s), else a
    throwaway `mlflow server` on a free loopback port (stopped on exit)."""
    if tracking_uri.startswith(("http://", "https://")):
        yield tracking_uri.rstrip("/")
        return
    port = _free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-1500:]
                raise ScreenshotError(f"mlflow server did not come up on {base} within {timeout_s:.0f} s:\n{tail}")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _close_assistant(page) -> None:
    """Close the UI's assistant side panel when it is open (it covers a third of the page)."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def _expand_parent(page) -> None:
    """Expand the parent run's row so its child trials show under it (the row's expander button)."""
    expander = page.locator('button[data-component-id*="runnamecellrenderer"]')
    if expander.count():
        expander.first.click()


#: page name -> (text to wait for, what to do before the picture).
PREPARE = {
    "runs": ("matching runs", (_close_assistant, _expand_parent)),
    "parent_run": ("Parameters", (_close_assistant,)),
    "front_plot": ("front.png", (_close_assistant,)),
    "trial_metrics": ("accuracy", (_close_assistant,)),
}


def capture_all(browser: str, base: str, targets: list[tuple[str, str]], out_dir: Path,
                size: tuple[int, int] = (1600, 1000), timeout_s: float = 60.0) -> list[Path]:
    """Render each (name, URL fragment) of the UI at `base` into out_dir/<name>.png with Playwright
    driving `browser` (headless): wait for the page's content, close the assistant panel, expand the
    parent run, then the picture. ScreenshotError when a page does not render."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise ScreenshotError("screenshots need Playwright: pip install 'sketchwalk-tune[screenshots]' "
                              "(or pip install playwright); the browser is the system Chromium") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with sync_playwright() as pw:
        try:
            chrome = pw.chromium.launch(executable_path=browser, args=["--no-sandbox", "--disable-gpu"])
        except PlaywrightError as exc:
            raise ScreenshotError(f"could not start {browser}: {str(exc).splitlines()[0]}") from None
        try:
            page = chrome.new_page(viewport={"width": size[0], "height": size[1]})
            for name, fragment in targets:
                wait_text, steps = PREPARE.get(name, ("", ()))
                try:
                    page.goto(f"{base}/{fragment}")
                    if wait_text:
                        page.get_by_text(wait_text).first.wait_for(timeout=timeout_s * 1000)
                    for step in steps:
                        step(page)
                    page.wait_for_timeout(2000)  # charts and lazy cells settle
                    path = out_dir / f"{name}.png"
                    page.screenshot(path=str(path))
                except PlaywrightError as exc:
                    raise ScreenshotError(f"{name} ({fragment}) did not render: {str(exc).splitlines()[0]}") from None
                paths.append(path)
        finally:
            chrome.close()
    return paths


def distinct_colours(path: Path, cap: int = 4096) -> int:
    """Distinct RGB colours of a PNG (up to `cap`): a blank page has one or two."""
    import matplotlib.image
    import numpy as np

    img = matplotlib.image.imread(str(path))[..., :3]
    flat = np.round(img.reshape(-1, 3) * 255).astype(np.int32)
    codes = flat[:, 0] * 65536 + flat[:, 1] * 256 + flat[:, 2]
    return int(min(len(np.unique(codes)), cap))


def pages(session: SweepSession) -> list[tuple[str, str]]:
    """(name, URL fragment) of the pages to render: runs table, parent, front plot, one trial's metrics."""
    tracker = session.tracker()
    exp = session.experiment_id
    runs = tracker.all_runs()
    parent = session.parent_run_id or next((r.run_id for r in runs if r.tags.get(TAG_ROLE) == ROLE_SWEEP), None)
    ml = "workflowType=machine_learning"  # the UI's model-training view (its default is the GenAI one)
    out = [("runs", f"#/experiments/{exp}/runs?{ml}")]
    if parent:
        out.append(("parent_run", f"#/experiments/{exp}/runs/{parent}?{ml}"))
        if "front.png" in tracker.artifact_names(parent):
            out.append(("front_plot", f"#/experiments/{exp}/runs/{parent}/artifacts/front.png?{ml}"))
    trials = [r for r in runs if r.role == "trial" and r.status == "FINISHED"]
    if trials:
        best = max(trials, key=lambda r: r.metrics.get("accuracy", float("-inf")))
        out.append(("trial_metrics", f"#/experiments/{exp}/runs/{best.run_id}/model-metrics?{ml}"))
    return out


def take_screenshots(session: SweepSession, out_dir: Path, browser: Optional[str] = None) -> dict:
    """Render every page of `pages(session)` into out_dir/<name>.png; returns the screenshots.json content."""
    browser = browser or find_browser()
    targets = pages(session)
    with mlflow_ui(session.tracking_uri) as base:
        paths = capture_all(browser, base, targets, out_dir)
    shots = [{"page": name, "url_path": fragment, "file": path.name, "bytes": path.stat().st_size,
              "distinct_colours": distinct_colours(path)} for (name, fragment), path in zip(targets, paths)]
    blank = [s["page"] for s in shots if s["distinct_colours"] < MIN_COLOURS]
    return {"sweep_id": session.sweep_id, "browser": browser, "pages": shots, "blank_pages": blank, "ok": not blank}
