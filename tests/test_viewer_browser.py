"""End to end: a real `panel serve viewer/` over runs trained by the pipeline, in headless Chromium.

Needs Debian's `chromium` (apt-get install chromium) and Playwright for Python; .ci/run
installs both. Without them these tests skip with the reason, except on CI, where a
missing browser is a failure rather than a silent skip.
"""

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from idx_files import write_dataset
from viewer_runs import training_like, write_run

from weightlapse.viewer.analysis.frames import mosaic
from weightlapse.viewer.plots import HEADER

pytestmark = pytest.mark.slow  # a real panel serve and Chromium

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("WEIGHTLAPSE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
HOSTILE_NAME = "<img src=x onerror=alert(1)>"
PARAMS = """\
data:
  dataset: mnist
train:
  max_steps: 300
  eval_every: 50
runs:
  trained: {}
"""


def _need(condition: bool, reason: str) -> None:
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run the browser tests)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """A run trained by the real train stage, a second run, and a broken run with an HTML name."""
    root = tmp_path_factory.mktemp("browser")
    data = root / "data"
    write_dataset(data, n_train=6000, n_test=100)
    (root / "params.yaml").write_text(PARAMS)
    runs = root / "runs"
    subprocess.run([sys.executable, "-m", "weightlapse.pipeline.train", "--params", str(root / "params.yaml"), "--run",
                    "trained", "--data", str(data), "--out", str(runs / "trained")], check=True, cwd=REPO,
                   capture_output=True)
    write_run(runs / "other", training_like(300, seed=3), name="other")
    broken = runs / HOSTILE_NAME / "trajectory.zarr"
    broken.mkdir(parents=True)
    (broken / "zarr.json").write_text("{ this is not json")
    return runs


class Server:
    """A real `panel serve viewer/` process; its log is kept to check for server-side errors."""

    def __init__(self, runs_dir: Path, log_path: Path, *, address: str = "127.0.0.1", hosts: tuple[str, ...] = (),
                 share: bool = False, extra: tuple[str, ...] = ()) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.port = port
        self.url = f"http://127.0.0.1:{port}/viewer"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - open while the server runs; a pipe could fill and block it
        origins = [arg for host in ("127.0.0.1", *hosts) for arg in ("--allow-websocket-origin", f"{host}:{port}")]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "panel", "serve", "viewer/", "--address", address, "--port", str(port), *origins,
             *extra, "--args", "--runs", str(runs_dir), *(["--share"] if share else [])],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"panel serve did not come up:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    def errors(self) -> list[str]:
        """Log lines of exceptions raised in the server, in the app or in Panel and Bokeh.

        Less Tornado's report of a message to a tab that closed as it was sent (a page's
        update racing its tab closing), which Tornado logs as an unretrieved task exception,
        and Bokeh's refusal of the bare WebSocket handshake that the origin test makes from
        the viewer's own origin (it sends no "bokeh" subprotocol, so Bokeh raises)."""
        log = self.log_path.read_text()
        log = re.sub(r"[^\n]*Task exception was never retrieved\nfuture: <Task finished [^\n]*WebSocketClosedError\(\)>\n"
                     r"(?:(?!\d{4}-\d\d-\d\d )[^\n]*\n)*", "", log)
        log = re.sub(r"[^\n]*Uncaught exception GET /viewer/ws [^\n]*\n(?:(?!\d{4}-\d\d-\d\d )[^\n]*\n)*?"
                     r"bokeh\.protocol\.exceptions\.ProtocolError: Subprotocol header is not 'bokeh'\n", "", log)
        return [line for line in log.splitlines()
                if "Traceback" in line or "Exception" in line or re.search(r"\b(ERROR|CRITICAL)\b", line)]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def running_server(runs_dir: Path, tmp_path_factory, **options):
    """A module fixture's body: a ready Server over ``runs_dir``, stopped after the module."""
    server = Server(runs_dir, tmp_path_factory.mktemp("server") / "panel.log", **options)
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def served(runs_dir, tmp_path_factory):
    yield from running_server(runs_dir, tmp_path_factory)


@pytest.fixture
def server(served):
    """The viewer's URL; after the test, the server must not have logged an exception."""
    yield served.url
    assert served.errors() == [], "\n".join(served.errors())


@pytest.fixture(scope="module")
def browser():
    _need(Path(CHROMIUM).exists() or bool(shutil.which(CHROMIUM)),
          f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "Playwright for Python is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A browser tab on the viewer that records console errors, page errors and dialogs."""

    def __init__(self, browser, url: str) -> None:
        self.page = browser.new_page(viewport={"width": 1400, "height": 1100})
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("requestfailed", lambda request: self.errors.append(f"request failed: {request.url[:200]}"))
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        self.page.goto(url)
        self.page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=30_000)
        self.wait_idle()

    def wait_idle(self, ms: int = 800) -> None:
        self.page.wait_for_timeout(ms)

    def tiles_png(self) -> np.ndarray:
        from PIL import Image

        shot = self.page.locator(".wl-tiles").first.screenshot()
        return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))

    def tile_data(self) -> list:
        """The weight grid's image array as the browser holds it (row 0 at the bottom)."""
        return self.page.evaluate("""() => {
            for (const model of Bokeh.documents[0].all_models) {
                if (model.type === 'GlyphRenderer' && model.glyph.type === 'Image') {
                    const image = model.data_source.data.image[0];
                    const shape = image.shape;
                    if (shape && shape[0] === 66 && shape[1] === 144) return Array.from(image);
                }
            }
            return null;
        }""")

    def text(self) -> str:
        """All text on the page, including inside the shadow roots Panel renders into."""
        return self.page.evaluate(DEEP_TEXT)

    def wait_for_text(self, text: str, timeout: int = 15_000) -> None:
        self.page.wait_for_function(f"() => ({DEEP_TEXT})().includes({text!r})", timeout=timeout)

    def close(self) -> None:
        self.page.close()


DEEP_TEXT = """() => {
    const parts = [];
    const visit = (node) => {
        if (node.nodeType === Node.TEXT_NODE) parts.push(node.textContent);
        if (node.shadowRoot) visit(node.shadowRoot);
        for (const child of node.childNodes) visit(child);
    };
    visit(document.body);
    return parts.join(' ');
}"""


def count_runs(mask: np.ndarray, min_length: int) -> int:
    """Number of separate stretches of at least ``min_length`` True values in a 1-d mask."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    starts = np.flatnonzero(np.diff(padded) == 1)
    ends = np.flatnonzero(np.diff(padded) == -1)
    return int(np.sum(ends - starts >= min_length))


def test_page_loads_with_ten_images_and_the_slider_moves_them(browser, server):
    # this step's colour scale: on the whole run's, step 0's small weights are nearly white
    tab = Page(browser, server + "?run=trained&step=0&scale=step")
    data = np.array(tab.tile_data(), dtype=np.float64)
    assert data.size == 66 * 144
    # ten 28x28 tiles of real numbers, NaN between them
    assert np.isfinite(data).sum() == 10 * 784

    picture = tab.tiles_png()
    if os.environ.get("WEIGHTLAPSE_SAVE_SHOTS"):
        from PIL import Image
        Image.fromarray(picture).save(os.environ["WEIGHTLAPSE_SAVE_SHOTS"])
    drawn = np.any(picture != 255, axis=2)          # the gaps between tiles are pure white
    colourful = np.ptp(picture.astype(int), axis=2) > 30
    rows_with_tiles = np.flatnonzero(colourful.sum(axis=1) > 0.3 * picture.shape[1] * 0.5)
    band = drawn[rows_with_tiles.min():rows_with_tiles.max() + 1]
    columns = band.mean(axis=0) > 0.6
    # A tile is about 90 screen pixels wide; the white gaps between them split the picture.
    assert count_runs(columns, min_length=60) == 5  # five columns of tiles
    tile_columns = np.flatnonzero(columns)
    rows = drawn[:, tile_columns[0]:tile_columns[0] + 20].mean(axis=1) > 0.9
    assert count_runs(rows, min_length=60) == 2     # two rows of tiles

    handle = tab.page.locator(".noUi-handle").last
    box = handle.bounding_box()
    tab.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    tab.page.mouse.down()
    tab.page.mouse.move(box["x"] + 400, box["y"] + box["height"] / 2, steps=5)
    tab.page.mouse.up()
    tab.wait_idle(1500)
    assert "step=0" not in tab.page.url and "step=" in tab.page.url
    moved = np.array(tab.tile_data(), dtype=np.float64)
    assert not np.array_equal(np.nan_to_num(moved), np.nan_to_num(data))
    assert not np.array_equal(tab.tiles_png(), picture)
    assert tab.errors == [] and tab.dialogs == []
    tab.close()


def test_diff_and_statistics_modes_render(browser, server):
    tab = Page(browser, server + "?run=trained&step=250")
    tab.page.get_by_role("button", name="Step vs step").click()
    tab.wait_for_text("L2 distance")
    assert "step 0 vs step 250" in tab.text()

    before = tab.tiles_png()
    tab.page.get_by_role("button", name="Statistics").click()
    # nothing computed yet: it says so, and neither the diff nor its table stays on the page
    tab.wait_for_text("Compute statistics” for steps")
    assert np.isnan(np.array(tab.tile_data(), dtype=np.float64)).all() and "L2 distance" not in tab.text()
    tab.page.get_by_role("button", name="Compute statistics").click()
    tab.wait_for_text("Top-changing pixels", timeout=60_000)
    tab.wait_idle(1000)
    assert "mode=statistics" in tab.page.url
    assert not np.array_equal(tab.tiles_png(), before)
    assert tab.errors == [] and tab.dialogs == []
    tab.close()


def test_compare_runs_mode_draws_the_comparison_and_the_random_walk_caveat(browser, server):
    tab = Page(browser, server + "?run=trained&mode=compare&runs=trained,other")
    tab.page.get_by_role("button", name="Compute comparison").click()
    tab.wait_for_text("Read the PCA with care", timeout=60_000)
    tab.wait_idle(1500)
    titles = tab.page.evaluate("""() => Array.from(Bokeh.documents[0].all_models)
        .filter((model) => model.type === 'Title').map((model) => model.text)""")
    for title in ("Distance from trained", "Cosine similarity of the weights", "Trajectories in a shared PCA basis",
                  "Variance explained", "A random walk, same PCA"):
        assert title in titles
    from PIL import Image

    shot = np.asarray(Image.open(io.BytesIO(tab.page.locator(".wl-comparison").first.screenshot())).convert("RGB"))
    if os.environ.get("WEIGHTLAPSE_SAVE_SHOTS"):
        Image.fromarray(shot).save(os.environ["WEIGHTLAPSE_SAVE_SHOTS"].replace(".png", "-compare.png"))
    colourful = np.ptp(shot.astype(int), axis=2) > 60
    assert colourful.mean() > 0.05  # heat map, spread map and curves are drawn, not blank frames
    assert "runs=trained%2Cother" in tab.page.url or "runs=trained,other" in tab.page.url
    assert tab.errors == [] and tab.dialogs == []
    tab.close()


def test_bad_runs_and_bad_links_show_a_message_and_run_no_script(browser, server):
    tab = Page(browser, server + "?run=..%2F..%2Fetc&step=banana&mode=%3Cscript%3E")
    text = tab.text()
    assert "could not be used" in text and "../../etc" in text
    assert HOSTILE_NAME in text          # the broken run is listed by its name, as text
    assert "broken" in text
    assert tab.dialogs == []             # its onerror payload never ran
    assert tab.page.locator("img[src=x]").count() == 0
    # the rest keeps working: the first run is shown and can be stepped
    assert len(tab.tile_data()) == 66 * 144
    assert tab.errors == []
    tab.close()


def test_follow_keeps_up_with_a_run_being_written(browser, server, runs_dir):
    rows = training_like(400, seed=5)
    writer = write_run(runs_dir / "live", rows[:50], n_steps=400, finish=False)
    try:
        tab = Page(browser, server + "?run=live&follow=1")
        tab.page.wait_for_function("() => location.search.includes('step=49')", timeout=10_000)
        for step in range(50, 200):
            writer.record_step(step, rows[step], 0.1)
        writer.flush()
        tab.page.wait_for_function("() => location.search.includes('step=199')", timeout=15_000)
        tab.wait_idle()
        shown = np.flipud(np.array(tab.tile_data(), dtype=np.float32).reshape(66, 144))
        np.testing.assert_array_equal(shown, mosaic(rows[199], header=HEADER))
        assert tab.errors == []
        tab.close()
    finally:
        writer.close()


def test_clicking_the_loss_curve_jumps_to_that_step(browser, server):
    tab = Page(browser, server + "?run=trained&step=0")
    box = tab.page.locator(".wl-loss-curve").first.bounding_box()
    # the middle of the plot area, which spans steps 1..300
    tab.page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    tab.page.wait_for_function("() => !location.search.includes('step=0&') && location.search.includes('step=')",
                               timeout=10_000)
    step = int(tab.page.evaluate("() => new URLSearchParams(location.search).get('step')"))
    assert 60 < step < 240
    assert tab.errors == []
    tab.close()


def shown_grid(tab: Page) -> np.ndarray:
    """The page's weight grid in picture orientation (row 0 on top)."""
    return np.flipud(np.array(tab.tile_data(), dtype=np.float32).reshape(66, 144))


def wait_for_grid(tab: Page, expected: np.ndarray, timeout: float = 15) -> None:
    """Until the page's weight grid is exactly ``expected`` (the page polls the runs every second)."""
    deadline = time.monotonic() + timeout
    while True:
        data = tab.tile_data()
        if data is not None and np.array_equal(shown_grid(tab), expected, equal_nan=True):
            return
        if time.monotonic() > deadline:
            np.testing.assert_array_equal(shown_grid(tab), expected)
        tab.wait_idle(250)


def url_step(tab: Page) -> int:
    return int(tab.page.evaluate("() => new URLSearchParams(location.search).get('step')"))


def shown_steps(tab: Page) -> list[int]:
    """The steps the page's weight-picture titles name."""
    return [int(step) for step in tab.page.evaluate("""() => Array.from(Bokeh.documents[0].all_models)
        .map((model) => model.type === 'Title' && /weights after step ([0-9,]+)/.exec(model.text))
        .filter(Boolean).map((found) => found[1].replace(/,/g, ''))""")]


def wait_for_step(tab: Page, step: int) -> None:
    tab.page.wait_for_function(f"() => new URLSearchParams(location.search).get('step') === '{step}'",
                               timeout=10_000)


def test_a_run_retrained_with_another_seed_and_length_is_shown_exactly(browser, server, runs_dir):
    old, new = training_like(300, seed=0), training_like(700, seed=9)
    write_run(runs_dir / "retrained", old, name="retrained")
    tab = Page(browser, server + "?run=retrained&step=40")
    wait_for_grid(tab, mosaic(old[40], header=HEADER))
    # `dvc repro --force` with another seed and length while the page is open
    shutil.rmtree(runs_dir / "retrained" / "trajectory.zarr")
    write_run(runs_dir / "retrained", new, name="retrained")
    wait_for_grid(tab, mosaic(new[40], header=HEADER))         # an early step, in the open page
    # The store is written a block (512 steps) at a time: a poll may have seen the first one only.
    tab.wait_for_text("step 700 of 700 written", timeout=10_000)
    tab.page.locator("body").press("End")                      # the late steps the old run never had
    wait_for_step(tab, 700)
    wait_for_grid(tab, mosaic(new[700], header=HEADER))
    fresh = Page(browser, server + "?run=retrained&step=650")  # and in a page opened now
    wait_for_grid(fresh, mosaic(new[650], header=HEADER))
    assert tab.errors == [] and fresh.errors == []
    tab.close()
    fresh.close()


def test_a_new_run_appears_without_a_click(browser, server, runs_dir):
    tab = Page(browser, server + "?run=trained")
    assert "appeared-later" not in tab.text()
    write_run(runs_dir / "appeared-later", training_like(30, seed=4), name="appeared-later")
    tab.wait_for_text("appeared-later", timeout=10_000)
    # The runs table and the run selector are separate models, updated one after the other.
    run_selector = tab.page.locator("select").first
    options = lambda: run_selector.evaluate("(select) => Array.from(select.options).map(o => o.text)")  # noqa: E731
    deadline = time.monotonic() + 10
    while "appeared-later" not in options() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "appeared-later" in options()
    assert tab.errors == []
    tab.close()


def test_keyboard_control_moves_the_step(browser, server):
    tab = Page(browser, server + "?run=trained&step=100")
    body = tab.page.locator("body")
    for key, expected in (("ArrowRight", 101), ("ArrowLeft", 100), ("Shift+ArrowRight", 200),
                          ("Shift+ArrowLeft", 100), ("Home", 0), ("End", 300)):
        body.press(key)
        wait_for_step(tab, expected)
    body.press("Home")
    wait_for_step(tab, 0)
    before = set(shown_steps(tab))      # a page may also hold a picture's earlier, unshown title
    body.press(" ")                                           # play: the picture moves ...
    deadline = time.monotonic() + 10
    while not [step for step in shown_steps(tab) if step > 3 and step not in before]:
        assert time.monotonic() < deadline, f"playback did not move the picture: {shown_steps(tab)}"
        tab.wait_idle(100)
    body.press(" ")                                           # ... and pause
    # The link catches up when it pauses, once the frames already on their way are shown
    # (a loaded machine may take seconds), and then stays put.
    tab.page.wait_for_function("() => Number(new URLSearchParams(location.search).get('step')) > 3",
                               timeout=10_000)
    paused, deadline = url_step(tab), time.monotonic() + 10
    while time.monotonic() < deadline:
        tab.wait_idle(500)
        if url_step(tab) == paused:
            break
        paused = url_step(tab)
    tab.wait_idle(800)
    assert url_step(tab) == paused
    assert paused in shown_steps(tab)                         # the picture is the step linked
    assert tab.errors == []
    tab.close()


def side_grid(tab: Page, index: int) -> np.ndarray | None:
    """Side by side's grid ``index`` as the browser holds it, in picture orientation (row 0 on top)."""
    data = tab.page.evaluate("""(name) => {
        for (const model of Bokeh.documents[0].all_models) {
            if (model.type === 'GlyphRenderer' && model.name === name) {
                return Array.from(model.data_source.data.image[0]);
            }
        }
        return null;
    }""", f"wl-side-{index}")
    return None if data is None else np.flipud(np.array(data, dtype=np.float32).reshape(66, 144))


def test_side_by_side_shows_each_runs_exact_step(browser, server, runs_dir):
    from weightlapse.viewer.analysis.runs import RunCatalog

    write_run(runs_dir / "short-side", training_like(100, seed=6), name="short-side")
    catalog = RunCatalog(runs_dir)
    rows = {name: np.asarray(catalog.open(name).weights()) for name in ("trained", "other", "short-side")}
    tab = Page(browser, server + "?run=trained&mode=side-by-side&side=other,short-side&step=150")
    for step in (150, 151, 251):
        deadline = time.monotonic() + 15
        expected = [mosaic(rows[name][min(step, len(rows[name]) - 1)], header=HEADER)
                    for name in ("trained", "other", "short-side")]
        while not all(np.array_equal(side_grid(tab, index), grid, equal_nan=True)
                      for index, grid in enumerate(expected)):
            assert time.monotonic() < deadline, f"the grids do not show step {step} of each run"
            tab.wait_idle(250)
        assert "short-side ends at step 100: it is shown at that step." in tab.text()
        tab.page.locator("body").press("ArrowRight" if step == 150 else "Shift+ArrowRight")
    if os.environ.get("WEIGHTLAPSE_SAVE_SHOTS"):
        tab.page.screenshot(path=os.environ["WEIGHTLAPSE_SAVE_SHOTS"].replace(".png", "-side-by-side.png"))
    assert tab.errors == [] and tab.dialogs == []
    tab.close()


def test_the_page_follows_a_dark_browser_and_renders_dark(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, color_scheme="dark")
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server + "?run=trained")
    page.wait_for_function("() => location.search.includes('theme=dark')", timeout=30_000)
    page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=30_000)
    page.wait_for_timeout(1500)
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    channels = [int(value) for value in re.findall(r"\d+", background)[:3]]
    assert sum(channels) / 3 < 80, background
    from PIL import Image

    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"))
    assert shot.mean() < 110  # mostly dark, with the tiles drawn
    if os.environ.get("WEIGHTLAPSE_SAVE_SHOTS"):
        page.screenshot(path=os.environ["WEIGHTLAPSE_SAVE_SHOTS"].replace(".png", "-dark.png"), full_page=True)
    assert errors == []
    page.close()


def websocket_handshake_status(page_url: str, origin: str) -> int:
    """The HTTP status the viewer's server answers a WebSocket upgrade from ``origin`` with."""
    host, port = page_url.split("//")[1].split("/")[0].split(":")
    request = (f"GET /viewer/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               f"Origin: {origin}\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request.encode())
        status_line = connection.recv(4096).split(b"\r\n", 1)[0].decode()
    return int(status_line.split()[1])


def test_websocket_connections_from_other_origins_are_refused(served):
    # A page on another site must not drive the viewer through the visitor's browser
    # (cross-site WebSocket hijacking); look-alike host names included (CVE-2026-21883).
    own = served.url.rsplit("/", 1)[0]
    host_port = own.split("//")[1]
    for forged in ("http://evil.example", f"http://{host_port}.evil.example", f"http://evil.example/{host_port}",
                   "null"):
        assert websocket_handshake_status(served.url, forged) == 403, forged
    assert websocket_handshake_status(served.url, own) != 403


def network_address() -> str | None:
    """This machine's address on its network (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # a UDP "connection" sends nothing; it picks the interface
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.parametrize("share", [False, True])
def test_other_machines_see_runs_only_when_shared(browser, runs_dir, tmp_path, share):
    # Served on every interface, as bare `panel serve` does: a browser elsewhere on the
    # network (here: this machine through its network address, not loopback) gets no run
    # unless the viewer was started with --share.
    address = network_address()
    if address is None:
        pytest.skip("this machine has no network interface besides loopback")
    server = Server(runs_dir, tmp_path / "panel.log", address="0.0.0.0", hosts=(address,), share=share)
    try:
        server.wait_ready()
        tabs = {"local": Page(browser, server.url), "remote": Page(browser, f"http://{address}:{server.port}/viewer")}
        for tab in tabs.values():
            tab.page.wait_for_function(f"() => ({DEEP_TEXT})().includes('trained') || "
                                       f"({DEEP_TEXT})().includes('private to the machine')", timeout=30_000)
        text = {where: tab.text() for where, tab in tabs.items()}
        for tab in tabs.values():
            tab.close()
        assert server.errors() == [], "\n".join(server.errors())
    finally:
        server.stop()
    assert "trained" in text["local"] and "private to the machine" not in text["local"]
    if share:
        assert "trained" in text["remote"] and "private to the machine" not in text["remote"]
    else:
        assert "private to the machine" in text["remote"] and "trained" not in text["remote"]


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_many_tabs_keep_the_server_memory_bounded(browser, runs_dir, tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the server's memory")
    # Sessions of closed tabs are discarded after 1 s here (Bokeh's default is 15 s).
    server = Server(runs_dir, tmp_path / "panel.log",
                    extra=("--unused-session-lifetime", "1000", "--check-unused-sessions", "500"))
    try:
        server.wait_ready()
        Page(browser, server.url + "?run=trained").close()  # the first session loads the libraries
        wait_for_log(server, "viewer page closed (0 open)")
        memory = {"idle": resident_mb(server.process.pid)}
        for round_ in range(1, ROUNDS + 1):
            tabs = [Page(browser, f"{server.url}?run=trained&step={(37 * i) % 300}") for i in range(TABS)]
            assert f"viewer page opened ({TABS} open)" in server.log_path.read_text()
            memory[f"{TABS} tabs, round {round_}"] = resident_mb(server.process.pid)
            for tab in tabs:
                assert errors_but_panel_cdn_styles(tab.errors) == [], tab.errors
                tab.close()
            wait_for_log(server, "viewer page closed (0 open)", after=round_ + 1)
        assert server.errors() == [], "\n".join(server.errors())
    finally:
        server.stop()
    print("server memory (MB):", {key: round(value) for key, value in memory.items()})
    per_tab = (memory[f"{TABS} tabs, round 1"] - memory["idle"]) / TABS
    assert per_tab < 50, f"{per_tab:.0f} MB per open tab"
    # Every page was closed (the log counts them), and closed pages give their memory back:
    # after a warm-up the server stops growing. The warm-up (caches and allocator arenas
    # filling) ends in round 2, 3 or 4 and may add up to 10 MB in each of two rounds (CI saw
    # +4.2 and +7.6 MB in rounds 3 and 4, then +0.2), so a round's growth is judged by the
    # least over rounds 3 to 5: a leak grows every round (when HoloViews' option cache held
    # each viewer through its plot hooks, each round of 4 tabs added about 5.5 MB), a warm-up
    # in some of them only.
    rounds = [memory[f"{TABS} tabs, round {round_}"] for round_ in range(1, ROUNDS + 1)]
    growth = float(np.min(np.diff(rounds)[1:]))
    assert growth < 3, f"{growth:.1f} MB more in every round of {TABS} tabs after the warm-up: {memory}"

TABS = 4
ROUNDS = 5


def errors_but_panel_cdn_styles(errors: list[str]) -> list[str]:
    """A tab's errors less Panel's CDN stylesheet links. Known, not fixed: with several sessions
    opening and closing at once, a few new tabs of the template get links to Panel's own
    stylesheets (loading.css, fast.css, listpanel.css) on its CDN instead of this server,
    which fail offline; the page still works. Every other browser test asserts no error."""
    cdn = "https://cdn.holoviz.org/panel/"
    kept = [error for error in errors if not error.startswith(f"request failed: {cdn}")]
    if len(kept) < len(errors):  # each failed request also logs one console line
        kept = [error for error in kept if error != "Failed to load resource: net::ERR_NAME_NOT_RESOLVED"]
    return kept


def wait_for_log(server: Server, line: str, *, after: int = 0, timeout: float = 60) -> None:
    """Wait until the server's log holds ``line`` more than ``after`` times in all."""
    deadline = time.monotonic() + timeout
    while server.log_path.read_text().count(line) < max(after, 1):
        assert time.monotonic() < deadline, f"no {line!r} in the server log"
        time.sleep(0.2)


PIXEL_CURVES = """() => Array.from(Bokeh.documents[0].all_models)
    .filter((model) => model.type === 'GlyphRenderer' && model.glyph.type === 'Line'
            && model.data_source.data.weight !== undefined)
    .map((model) => ({step: Array.from(model.data_source.data.step),
                      weight: Array.from(model.data_source.data.weight),
                      width: model.glyph.line_width.value ?? model.glyph.line_width}))"""


def test_clicking_a_pixel_plots_its_stored_weights_over_every_step(browser, server, runs_dir):
    from weightlapse.pipeline.store import check_store, open_history, open_run

    tab = Page(browser, server + "?run=trained&step=150")
    tab.wait_for_text("Click a pixel of a class image")
    box = tab.page.locator(".wl-tiles").first.bounding_box()
    tab.page.mouse.click(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.35)  # in the third tile
    tab.page.wait_for_function("() => new URLSearchParams(location.search).get('pixel')", timeout=10_000)
    query = tab.page.evaluate("() => Object.fromEntries(new URLSearchParams(location.search))")
    assert query["class"] == "2"
    row, col = (int(part) for part in query["pixel"].split(","))
    tab.page.wait_for_function(f"() => ({PIXEL_CURVES})().length === 10", timeout=15_000)
    stored = open_run(runs_dir / "trained").weights.values[:, :, row * 28 + col]  # (step, class)
    curves = tab.page.evaluate(PIXEL_CURVES)
    thick = [curve for curve in curves if curve["width"] == 3]
    assert len(thick) == 1 and np.array_equal(np.float32(thick[0]["weight"]), stored[:, 2])
    drawn = sorted(tuple(np.float32(curve["weight"])) for curve in curves)
    assert drawn == sorted(tuple(stored[:, index]) for index in range(10))  # every class, every stored value
    assert all(curve["step"] == list(range(301)) for curve in curves)
    # read from the pixel history the train stage built
    assert open_history(runs_dir / "trained", check_store(runs_dir / "trained")).steps == 301
    tab.wait_for_text("301 from the pixel history")
    # hovering the curve shows a step's value
    plot = tab.page.locator(".wl-inspector").first.bounding_box()
    tab.page.mouse.move(plot["x"] + plot["width"] * 0.3, plot["y"] + plot["height"] * 0.5)
    tab.page.mouse.move(plot["x"] + plot["width"] * 0.4, plot["y"] + plot["height"] * 0.5, steps=5)
    tab.page.wait_for_function(f"() => /weight:\\s*-?\\d\\.\\d{{7}}/.test(({DEEP_TEXT})())", timeout=10_000)
    assert tab.errors == [] and tab.dialogs == []
    tab.close()


# -- a network recorded with Recorder, served by the README's command -----------------------------------
def readme_view_command() -> list[str]:
    """The command the README's Recorder section gives for opening the run in the viewer."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Record your own training loop"):]
    line = re.search(r"```sh\n(weightlapse view [^\n#]*?)\s*(#[^\n]*)?\n```", section).group(1)
    return line.split()


class ReadmeServer(Server):
    """The README's `weightlapse view runs/` (plus a free port), run where the example ran."""

    def __init__(self, cwd: Path, log_path: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/viewer"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - open while the server runs
        command = readme_view_command()
        assert command[:2] == ["weightlapse", "view"]
        self.process = subprocess.Popen([sys.executable, "-m", "weightlapse.cli", *command[1:], "--port",
                                         str(self.port)], cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def network_served(tmp_path_factory):
    from network_runs import mlp, record

    where = tmp_path_factory.mktemp("readme-network")
    seen = record(where / "runs" / "my-mlp", mlp(hidden=16), steps=6)
    server = ReadmeServer(where, where / "panel.log")
    server.wait_ready()
    yield server, seen
    server.stop()


def network_image(tab: Page, shape: tuple[int, int]):
    """The network picture of ``shape`` as the browser holds it (row 0 at the bottom), or None."""
    data = tab.page.evaluate("""([rows, columns]) => {
        for (const model of Bokeh.documents[0].all_models) {
            if (model.type === 'GlyphRenderer' && model.glyph.type === 'Image') {
                const image = model.data_source.data.image[0];
                if (image.shape && image.shape[0] === rows && image.shape[1] === columns) return Array.from(image);
            }
        }
        return null;
    }""", list(shape))
    return None if data is None else np.array(data, dtype=np.float32).reshape(shape)


def wait_for_image(tab: Page, shape: tuple[int, int], expected: np.ndarray, what: str) -> None:
    deadline = time.monotonic() + 20
    while not np.array_equal(network_image(tab, shape), expected, equal_nan=True):
        assert time.monotonic() < deadline, f"the page does not show {what}"
        tab.wait_idle(250)


def test_a_recorded_mlp_opens_with_the_readmes_command_and_replays_its_layers(browser, network_served):
    from weightlapse.viewer.analysis.layouts import layer_layout

    server, seen = network_served
    tab = Page(browser, server.url + "?run=my-mlp")
    units = layer_layout((16, 784))
    shape = units.index.shape
    # 16 unit images of real numbers (NaN between them), the newest step, titled by unit index
    wait_for_image(tab, shape, np.flipud(units.picture(seen[6]["hidden1.weight"])), "the hidden layer at step 6")
    assert np.isfinite(network_image(tab, shape)).sum() == 16 * 784
    drawn_text = tab.page.evaluate("""() => {
        const texts = [];
        for (const model of Bokeh.documents[0].all_models) {
            if (model.type === 'Title') texts.push(model.text);
            if (model.type === 'GlyphRenderer' && model.glyph.type === 'Text') texts.push(...model.data_source.data.text);
        }
        return texts;
    }""")
    assert {f"unit {unit}" for unit in range(16)} <= set(drawn_text)
    assert "my-mlp: hidden1.weight after step 6" in drawn_text
    tab.page.locator(".wl-layer select").select_option(index=2)  # output.weight, the third in the model's order
    wait_for_image(tab, (10, 16), seen[6]["output.weight"], "the output layer's heatmap")
    tab.page.wait_for_function("() => location.search.includes('layer=output.weight')", timeout=10_000)
    tab.page.locator("body").press("Home")  # the player goes to step 0
    wait_for_image(tab, (10, 16), seen[0]["output.weight"], "the output layer at step 0")
    tab.page.locator("body").press("ArrowRight")
    wait_for_image(tab, (10, 16), seen[1]["output.weight"], "the output layer at step 1")
    if os.environ.get("WEIGHTLAPSE_SAVE_SHOTS"):
        tab.page.screenshot(path=os.environ["WEIGHTLAPSE_SAVE_SHOTS"].replace(".png", "-network-output.png"))
    assert tab.errors == [] and tab.dialogs == []
    tab.close()
    assert server.errors() == [], "\n".join(server.errors())
