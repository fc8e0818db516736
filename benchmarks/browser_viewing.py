"""The viewer as Chromium sees it, for benchmarks/viewing.py: playback frame rate and step-change latency.

A real ``panel serve viewer/`` over the runs directory, a headless Chromium page on it
(Playwright, /usr/bin/chromium). In the page, a hook counts the weight grid's image data
as it arrives: each new image array in the grid's ColumnDataSource is a frame, and the
plot's title names its step. Nothing here is a test; the numbers go into docs/benchmarks.md.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

# Installs window.wl: every image array that reaches the watched grids, with its arrival
# time, the step in its title, and how many frames were painted (requestAnimationFrame).
HOOK = """(names) => {
    const doc = Bokeh.documents[0];
    const renderers = [];
    for (const model of doc.all_models) {
        if (model.type !== 'GlyphRenderer' || model.glyph.type !== 'Image') continue;
        if (names.length ? names.includes(model.name) : (model.name || '') === '' &&
            model.data_source.data.image[0].shape[0] === 66) renderers.push(model);
    }
    const titles = [];
    for (const model of doc.all_models) {
        if (model.type === 'Title' && /step [0-9,]+/.test(model.text)) titles.push(model);
    }
    window.wl = {arrivals: [], renderers: renderers.length, painted: 0,
                 titles: () => titles.map((title) => title.text).join(' | ')};
    renderers.forEach((renderer, index) => {
        const source = renderer.data_source;
        source.properties.data.change.connect(() => {
            // a fingerprint of the image, to count distinct frames rather than updates
            const image = source.data.image[0];
            let hash = 0;
            for (let i = 0; i < image.length; i += 3) if (image[i] === image[i]) hash = (hash * 31 + image[i] * 1e7) % 1e12;
            window.wl.arrivals.push([performance.now(), index, hash]);
        });
    });
    const paint = () => { window.wl.painted += 1; requestAnimationFrame(paint); };
    requestAnimationFrame(paint);
    return renderers.length;
}"""


class PanelServer:
    """``panel serve viewer/`` on a free local port over ``runs_dir``."""

    def __init__(self, runs_dir: Path, log_path: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/viewer"
        self._log = open(log_path, "w")  # noqa: SIM115 - open while the server runs
        self.process = subprocess.Popen(
            [sys.executable, "-m", "panel", "serve", "viewer/", "--address", "127.0.0.1", "--port", str(self.port),
             "--allow-websocket-origin", f"127.0.0.1:{self.port}", "--args", "--runs", str(runs_dir)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=5):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"panel serve did not start; see {log_path}") from None
                time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def open_page(browser, url: str, names: list[str]):
    page = browser.new_page(viewport={"width": 1600, "height": 1100})
    page.goto(url)
    page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=60_000)
    page.wait_for_timeout(3000)
    found = page.evaluate(HOOK, names)
    if found != max(len(names), 1):
        raise RuntimeError(f"found {found} weight grids in the page, expected {max(len(names), 1)}")
    return page


def playback(page, fps_label: str, seconds: float) -> dict:
    """Play at ``fps_label`` (the page's Frame rate choice) for ``seconds``: distinct frames per second."""
    page.locator("select").filter(has_text=fps_label).first.select_option(label=fps_label)
    page.wait_for_timeout(500)
    page.evaluate("() => { window.wl.arrivals = []; window.wl.painted = 0; }")
    page.locator("body").press(" ")                       # play
    page.wait_for_timeout(1000)                           # playback settles
    start = page.evaluate("() => [performance.now(), window.wl.arrivals.length, window.wl.painted]")
    page.wait_for_timeout(seconds * 1000)
    end = page.evaluate("() => [performance.now(), window.wl.arrivals.length, window.wl.painted]")
    arrivals = page.evaluate("() => window.wl.arrivals")
    page.locator("body").press(" ")                       # pause
    page.wait_for_timeout(800)
    elapsed = (end[0] - start[0]) / 1000
    window = [(index, fingerprint) for at, index, fingerprint in arrivals if start[0] <= at <= end[0]]
    grids = sorted({index for index, _ in window}) or [0]
    # frames: distinct images of the grid that got the fewest (each grid alone in Side by side)
    distinct = min(len({fingerprint for index, fingerprint in window if index == grid}) for grid in grids)
    return {"asked_fps": float(fps_label.split()[0]), "distinct_fps": distinct / elapsed,
            "updates_per_s": len(window) / len(grids) / elapsed, "painted_fps": (end[2] - start[2]) / elapsed,
            "seconds": elapsed}


def jump_latency(page, steps: list[int], grids: int) -> dict:
    """Milliseconds from the page asking for a step (the player's value set, as a click does) until
    every watched grid holds that step's image."""
    times = []
    for step in steps:
        took = page.evaluate("""([step, grids]) => new Promise((resolve) => {
            const player = Array.from(Bokeh.documents[0].all_models).find((model) => model.type === 'panel.models.widgets.Player');
            const before = window.wl.arrivals.length;
            const started = performance.now();
            const check = () => {
                const fresh = window.wl.arrivals.slice(before);
                const shown = new Set(fresh.map(([, index]) => index));
                if (shown.size >= grids && window.wl.titles().includes('step ' + step.toLocaleString('en-US'))) {
                    resolve(fresh[fresh.length - 1][0] - started);
                } else if (performance.now() - started > 10000) resolve(null);
                else setTimeout(check, 1);
            };
            player.value = step;
            check();
        })""", [int(step), grids])
        if took is not None:
            times.append(took)
        page.wait_for_timeout(150)
    times = np.array(times)
    return {"ms_median": float(np.median(times)), "ms_p95": float(np.percentile(times, 95)),
            "samples": len(times), "timeouts": len(steps) - len(times)}


def measure(runs_dir: Path, run: str, n_steps: int, *, beside: list[str], log_dir: Path,
            seconds: float = 6.0, jumps: int = 30) -> dict:
    from playwright.sync_api import sync_playwright

    rng = np.random.default_rng(3)
    server = PanelServer(runs_dir, log_dir / "panel-benchmark.log")
    results: dict = {}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            start = int(rng.integers(0, n_steps // 2))
            page = open_page(browser, f"{server.url}?run={run}&step={start}", [])
            results["jump"] = jump_latency(page, [int(step) for step in rng.integers(0, n_steps, jumps)], 1)
            results["playback"] = [playback(page, label, seconds) for label in ("10 fps", "20 fps", "30 fps")]
            page.close()
            side = ",".join(beside)
            names = [f"wl-side-{index}" for index in range(len(beside) + 1)]
            page = open_page(browser, f"{server.url}?run={run}&mode=side-by-side&side={side}&step={start}", names)
            results["side_by_side_runs"] = len(names)
            results["side_by_side_jump"] = jump_latency(page, [int(step) for step in rng.integers(0, n_steps, jumps)],
                                                        len(names))
            results["side_by_side_playback"] = [playback(page, "30 fps", seconds)]
            page.close()
            browser.close()
    finally:
        server.stop()
    return results
