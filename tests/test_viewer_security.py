"""The viewer against hostile data and hostile sites, with a real `panel serve viewer/`.

No script from data: run names, class names and params written into real stores carry
HTML payloads; every mode is opened in headless Chromium, and the payloads must show as
text and never run. No cross-site access: requests naming a Host the viewer does not
serve (what a DNS-rebinding page sends) are refused, the page, its WebSocket and the
other endpoints alike, while loopback names and the names given with
--allow-websocket-origin keep working.

The browser tests need what tests/test_viewer_browser.py needs (Chromium, Playwright).
"""

import os
import re
import socket
import urllib.parse
import urllib.request
from pathlib import Path

import panel as pn
import pytest
from test_viewer_browser import Page, Server, browser, running_server  # noqa: F401 - browser is a fixture
from viewer_runs import training_like, write_run

from weightlapse.viewer.access import host_is_served
from weightlapse.viewer.comparison import text_options

pytestmark = pytest.mark.slow  # a real panel serve and Chromium

# Payloads without "/": a directory name cannot hold one.
HOSTILE_RUNS = ("<img src=x onerror=alert(1)>", "<svg onload=alert(2)>", "<script>alert(3)",
                '"><img src=x onerror=alert(4)>', "<b onmouseover=alert(5)>bold", "&lt;i&gt;entity")
HOSTILE_CLASSES = ["<img src=x onerror=alert(11)>", "<svg onload=alert(12)>", "<b onmouseover=alert(13)>b",
                   "<i>italic", "c4", "c5", "c6", "c7", "c8", "c9"]
HOSTILE_OPTIMIZER = "<img src=x onerror=alert(21)>"
BROKEN_RUN = "<svg onload=alert(8)>broken"

# Elements a payload would create: an event-handler attribute or a script that calls
# alert (as every payload does), anywhere in the page, shadow roots included.
INJECTED = """() => {
    const found = [];
    const visit = (root) => {
        for (const element of root.querySelectorAll('*')) {
            for (const attribute of element.attributes) {
                // the template's own chrome has handlers (its sidebar button, theme switch);
                // every payload here calls alert
                if (attribute.name.startsWith('on') && attribute.value.includes('alert(')) {
                    found.push(element.outerHTML.slice(0, 120));
                }
            }
            if (element.tagName === 'SCRIPT' && element.textContent.includes('alert(')) {
                found.push(element.outerHTML.slice(0, 120));
            }
            if (element.shadowRoot) visit(element.shadowRoot);
        }
    };
    visit(document);
    return found;
}"""
# The text a reader sees: Page.text() without hidden elements (such as the native select
# Choices.js keeps behind the multi-choice, which holds the labels as sent).
VISIBLE_TEXT = """() => {
    const parts = [];
    const visit = (node) => {
        if (node.nodeType === Node.TEXT_NODE) parts.push(node.textContent);
        if (node.nodeType === Node.ELEMENT_NODE) {
            const style = getComputedStyle(node);
            if (node.hidden || style.display === 'none' || node.tagName === 'STYLE') return;
        }
        if (node.shadowRoot) visit(node.shadowRoot);
        for (const child of node.childNodes) visit(child);
    };
    visit(document.body);
    return parts.join(' ');
}"""
ESCAPED_TWICE = ("&lt;img", "&lt;svg", "&lt;script", "&lt;b", "&amp;", "&quot;")


@pytest.fixture(scope="module")
def hostile_runs(tmp_path_factory) -> Path:
    """Readable runs named with HTML payloads, with payloads for class names and params, and a broken one."""
    runs = tmp_path_factory.mktemp("hostile") / "runs"
    for seed, name in enumerate(HOSTILE_RUNS):
        write_run(runs / name, training_like(60, seed=seed), name=name, class_names=HOSTILE_CLASSES,
                  params={"optimizer": HOSTILE_OPTIMIZER, "lr": "<svg onload=alert(22)>", "seed": seed})
    broken = runs / BROKEN_RUN / "trajectory.zarr"
    broken.mkdir(parents=True)
    (broken / "zarr.json").write_text("{ <img src=x onerror=alert(9)>")
    return runs


@pytest.fixture(scope="module")
def hostile_server(hostile_runs, tmp_path_factory):
    yield from running_server(hostile_runs, tmp_path_factory)


def no_script_ran(tab: Page, where: str) -> None:
    assert tab.dialogs == [], f"{where}: a payload opened a dialog: {tab.dialogs}"
    assert tab.errors == [], f"{where}: {tab.errors}"
    injected = tab.page.evaluate(INJECTED)
    assert injected == [], f"{where}: elements made from data: {injected}"
    visible = tab.page.evaluate(VISIBLE_TEXT)
    garbled = [entity for entity in ESCAPED_TWICE if entity in visible]
    assert garbled == [], f"{where}: names shown escaped twice ({garbled})"


def chosen_runs(tab: Page) -> list[str]:
    """The runs the "Compare runs" multi-choice shows as chosen, as a reader sees them."""
    items = tab.page.locator(".choices__inner").locator("visible=true").first.locator(".choices__item").all_inner_texts()
    return [item.removesuffix("Remove item") for item in items]  # each item's delete button


def query(**values: str) -> str:
    return "?" + urllib.parse.urlencode(values)


def test_hostile_names_and_values_show_as_text_in_every_mode(browser, hostile_server):  # noqa: F811
    first, second = HOSTILE_RUNS[0], HOSTILE_RUNS[1]
    tab = Page(browser, hostile_server.url + query(run=first, compare=second))
    tab.wait_idle(1500)
    no_script_ran(tab, "replay")
    text = tab.text()
    for name in (*HOSTILE_RUNS, BROKEN_RUN, HOSTILE_OPTIMIZER):
        assert name in text, f"{name!r} is not on the page as text"

    # the run pickers, opened; and the runs table, hovered row by row
    for select in tab.page.locator("select").all():
        if not select.is_visible():
            continue  # the pickers of other modes
        select.click()
        tab.wait_idle(200)
        tab.page.keyboard.press("Escape")
    for row in tab.page.locator("table.wl-runs tr").all():
        row.hover()
    tiles = tab.page.locator(".wl-tiles").first.bounding_box()
    tab.page.mouse.move(tiles["x"] + tiles["width"] * 0.3, tiles["y"] + tiles["height"] * 0.5)
    tab.wait_idle(300)
    no_script_ran(tab, "replay, pickers opened and table hovered")

    tab.page.get_by_role("button", name="Step vs step").click()
    tab.wait_for_text("L2 distance")
    assert HOSTILE_CLASSES[0] in tab.text()  # the per-class table
    no_script_ran(tab, "step vs step")

    tab.page.get_by_role("button", name="Run vs run").click()
    tab.wait_for_text(f"{first} vs {second}")
    no_script_ran(tab, "run vs run")

    tab.page.get_by_role("button", name="Statistics").click()
    tab.page.get_by_role("button", name="Compute statistics").click()
    tab.wait_for_text("Top-changing pixels", timeout=60_000)
    no_script_ran(tab, "statistics")

    tab.page.get_by_role("button", name="Side by side").click()
    tab.page.locator(".choices__inner").locator("visible=true").first.click()  # the runs to add, listed
    tab.wait_idle(300)
    tab.page.keyboard.press("Enter")                                           # one of them chosen
    tab.wait_idle(800)
    tab.page.keyboard.press("Escape")
    assert len(tab.page.locator(".wl-side-grid").all()) == 2
    no_script_ran(tab, "side by side, a hostile run beside another")

    tab.page.get_by_role("button", name="Compare runs").click()
    group = tab.page.locator("select").filter(has_text=HOSTILE_OPTIMIZER).first
    group.select_option(index=1)  # the group of the hostile runs (they differ only in seed)
    tab.wait_idle(1000)
    chosen = chosen_runs(tab)
    assert sorted(chosen) == sorted(HOSTILE_RUNS)
    tab.page.locator(".choices__inner").locator("visible=true").first.click()  # the multi-choice's dropdown
    tab.wait_idle(300)
    no_script_ran(tab, "compare runs, runs chosen")
    tab.page.set_viewport_size({"width": 1280, "height": 1100})
    tab.wait_idle(500)
    if os.environ.get("WEIGHTLAPSE_SAVE_SHOTS"):  # to look at: names must read as plain text
        tab.page.screenshot(path=os.environ["WEIGHTLAPSE_SAVE_SHOTS"].replace(".png", "-hostile.png"), full_page=True)
    tab.page.keyboard.press("Escape")

    tab.page.get_by_role("button", name="Compute comparison").click()
    tab.wait_for_text("Read the PCA with care", timeout=60_000)
    tab.wait_idle(1500)
    titles = tab.page.evaluate("""() => Array.from(Bokeh.documents[0].all_models)
        .filter((model) => model.type === 'Title').map((model) => model.text)""")
    assert f"Distance from {chosen[0]}" in titles  # the first chosen run is the reference
    heatmap = tab.page.locator(".wl-comparison .bk-Canvas").nth(3).bounding_box()
    tab.page.mouse.move(heatmap["x"] + heatmap["width"] * 0.5, heatmap["y"] + heatmap["height"] * 0.5)
    tab.wait_idle(500)
    no_script_ran(tab, "compare runs, computed and hovered")
    if os.environ.get("WEIGHTLAPSE_SAVE_SHOTS"):
        tab.page.screenshot(path=os.environ["WEIGHTLAPSE_SAVE_SHOTS"].replace(".png", "-hostile-compared.png"),
                            full_page=True)
    tab.close()
    assert hostile_server.errors() == [], "\n".join(hostile_server.errors())


def test_a_link_to_hostile_runs_selects_them_by_name(browser, hostile_server):  # noqa: F811
    chosen = list(HOSTILE_RUNS[2:5])
    tab = Page(browser, hostile_server.url + query(run=HOSTILE_RUNS[3], mode="compare", runs=",".join(chosen)))
    tab.wait_idle(1000)
    assert sorted(chosen_runs(tab)) == sorted(chosen)  # (shown in the runs' order, not the link's)
    shown = urllib.parse.parse_qs(urllib.parse.urlparse(tab.page.url).query)
    assert shown["runs"] == [",".join(chosen)] and shown["run"] == [HOSTILE_RUNS[3]]
    assert "could not be used" not in tab.text()
    no_script_ran(tab, "compare runs from a link")
    tab.close()


# -- Host allowlist (DNS rebinding) -----------------------------------------------------------------


def http_get(port: int, path: str, host: str) -> tuple[int, str]:
    """Status and body of a GET of ``path`` on 127.0.0.1:``port``, sent with the header ``Host: host``."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode("utf-8", errors="replace")


def session_token(server: Server) -> str:
    """A session token, from the app page as a browser on this machine gets it."""
    with urllib.request.urlopen(server.url, timeout=30) as response:
        page = response.read().decode()
    return re.search(r'"token":\s*"([^"]+)"', page).group(1)


def websocket_status(port: int, *, host: str, origin: str, token: str) -> int:
    """The status of a WebSocket upgrade to the app, as a page of ``origin`` reaching ``host`` sends it."""
    request = (f"GET /viewer/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               f"Sec-WebSocket-Protocol: bokeh, {token}\r\nOrigin: {origin}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request.encode())
        status_line = connection.recv(4096).split(b"\r\n", 1)[0].decode()
    return int(status_line.split()[1])


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("plain") / "runs"
    write_run(runs / "plain", training_like(40, seed=1), name="plain")
    return runs


@pytest.fixture(scope="module")
def loopback_server(plain_runs, tmp_path_factory):
    yield from running_server(plain_runs, tmp_path_factory)


ENDPOINTS = ("/viewer", "/viewer/autoload.js?bokeh-autoload-element=x&bokeh-absolute-url=http://evil.example",
             "/viewer/metadata", "/", "/favicon.ico", "/static/js/bokeh.min.js", "/no-such-page")


@pytest.mark.parametrize("path", ENDPOINTS)
def test_requests_for_a_host_the_viewer_does_not_serve_are_refused(loopback_server, path):
    port = loopback_server.port
    status, body = http_get(port, path, f"evil.example:{port}")
    assert status == 403
    assert "evil.example" in body and "--allow-websocket-origin" in body and "docs/serving.md" in body
    assert "bokeh" not in body.lower()  # no page, no script, no token


def test_the_page_answers_loopback_names_on_its_port(loopback_server):
    port = loopback_server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"127.8.9.10:{port}", f"LOCALHOST:{port}"):
        status, body = http_get(port, "/viewer", host)
        assert status == 200, host
        assert "bokeh" in body.lower()
    # Panel's page handler logs a traceback for an IPv6 Host (panel/io/location.py splits
    # it on ":"), so [::1] is tried on a static file: the guard lets it through.
    assert http_get(port, "/static/js/bokeh.min.js", f"[::1]:{port}")[0] == 200
    # a loopback name on another port is another server
    assert http_get(port, "/viewer", f"127.0.0.1:{port + 1}")[0] == 403
    assert http_get(port, "/viewer", "localhost")[0] == 403


def redirect_of(port: int, path: str) -> tuple[int, str | None]:
    """Status and Location header of a GET of ``path`` on the viewer, as this machine's browser sends it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        response = b""
        while chunk := connection.recv(65536):
            response += chunk
    head = response.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
    location = next((line.split(":", 1)[1].strip() for line in head if line.lower().startswith("location:")), None)
    return int(head[0].split()[1]), location


def test_a_link_to_the_server_root_keeps_its_query(loopback_server):
    port = loopback_server.port
    status, location = redirect_of(port, "/?run=plain&step=3&mode=step-diff")
    assert status == 302 and location == "/viewer?run=plain&step=3&mode=step-diff"
    # the query is re-encoded, never a header or another site
    status, location = redirect_of(port, "/?run=%0D%0ASet-Cookie:%20x&next=//evil.example/")
    assert status == 302 and location == "/viewer?run=%0D%0ASet-Cookie%3A+x&next=%2F%2Fevil.example%2F"
    assert redirect_of(port, "/")[1] in ("./viewer", "/viewer")  # Bokeh's own redirect
    assert redirect_of(port, "/no-such-page?run=plain")[0] == 404
    assert redirect_of(port, "/viewer?run=plain")[0] == 200


def test_a_websocket_reached_through_dns_rebinding_is_refused(loopback_server):
    # A page on rebind.example whose name now points at 127.0.0.1: the browser sends the
    # attacker's name as Host and as Origin, which Tornado counts as same-origin.
    port = loopback_server.port
    token = session_token(loopback_server)
    assert websocket_status(port, host=f"rebind.example:{port}", origin=f"http://rebind.example:{port}",
                            token=token) == 403
    assert websocket_status(port, host=f"127.0.0.1:{port}", origin=f"http://127.0.0.1:{port}", token=token) == 101


@pytest.mark.parametrize("allowed", ["viewer.lab.example", "*"])
def test_names_given_with_allow_websocket_origin_are_served(plain_runs, tmp_path, allowed):
    server = Server(plain_runs, tmp_path / "panel.log", hosts=(allowed,))
    try:
        server.wait_ready()
        port = server.port
        name = "any-name.example" if allowed == "*" else allowed
        assert http_get(port, "/viewer", f"{name}:{port}")[0] == 200
        assert websocket_status(port, host=f"{name}:{port}", origin=f"http://{name}:{port}",
                                token=session_token(server)) == 101
        assert http_get(port, "/viewer", f"evil.example:{port}")[0] == (200 if allowed == "*" else 403)
    finally:
        server.stop()


def test_the_app_renders_on_127_0_0_1_and_on_localhost(browser, loopback_server):  # noqa: F811
    for url in (loopback_server.url, loopback_server.url.replace("127.0.0.1", "localhost")):
        tab = Page(browser, url)
        tab.wait_for_text("plain")
        assert "Follow newest step" in tab.text()
        assert tab.errors == [] and tab.dialogs == []
        tab.close()
    assert loopback_server.errors() == [], "\n".join(loopback_server.errors())


# -- the Host check itself ----------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "served"), [
    ("127.0.0.1:5006", True), ("localhost:5006", True), ("LocalHost:5006", True), ("127.1.2.3:5006", True),
    ("[::1]:5006", True), ("viewer.lab.example:5006", True),
    ("127.0.0.1:5007", False), ("localhost", False), ("evil.example:5006", False), ("::1:5006", False),
    ("localhost.evil.example:5006", False), ("127.0.0.1.evil.example:5006", False), ("", False),
    ("viewer.lab.example:5007", False), ("[::ffff:127.0.0.1]:5006", True), ("0.0.0.0:5006", False),
])
def test_host_is_served(host, served):
    assert host_is_served(host, port=5006, allowlist=["localhost:5006", "viewer.lab.example:5006"]) is served


def test_host_is_served_with_a_wildcard_allows_any_name():
    assert host_is_served("anything.example:1234", port=5006, allowlist=["*"])
    assert host_is_served("anything.example:5006", port=5006, allowlist=["*:5006"])
    assert not host_is_served("anything.example:1234", port=5006, allowlist=["*:5006"])
    assert host_is_served("localhost:80", port=80, allowlist=[])


def test_compare_runs_options_label_each_run_with_its_escaped_name():
    names = ["<img src=x onerror=alert(1)>", "a&b", "plain"]
    choice = pn.widgets.MultiChoice(options=text_options(names), value=names[:2])
    model = choice.get_root()
    # Choices.js renders the labels as HTML: what it gets must be the names, escaped once
    assert model.options == ["&lt;img src=x onerror=alert(1)&gt;", "a&amp;b", "plain"]
    assert model.value == ["&lt;img src=x onerror=alert(1)&gt;", "a&amp;b"]
    assert choice.value == names[:2]  # the app keeps working with the names themselves
