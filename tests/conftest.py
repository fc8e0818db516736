from __future__ import annotations

import http.server
import socket
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Self

import pytest

from idx_files import write_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist-t10k"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def shared_mnist() -> Path:
    """The real MNIST test split, present beside the repo on CI machines only."""
    if not (SHARED_MNIST / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST test split not found at {SHARED_MNIST} (only CI machines have ../shared)")
    return SHARED_MNIST


@pytest.fixture
def debian_fashion() -> Path:
    if not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return DEBIAN_FASHION


@pytest.fixture
def generated_data(tmp_path) -> tuple[Path, dict[str, str]]:
    directory = tmp_path / "generated"
    return directory, write_dataset(directory)


class FaultyFileServer:
    """An HTTP server on 127.0.0.1 serving bytes per path, with injectable faults.

    ``routes[path] = [response, ...]``: each request takes the next response (the last one
    repeats). A response is ("ok", body), ("status", code), ("truncate", body): the
    full Content-Length is announced but the connection closes halfway, ("stall", body):
    the headers and the first bytes come, then nothing for ``stall_s`` seconds,
    ("endless", block): no Content-Length and ``block`` over and over until the client hangs
    up, or ("trickle", body): the full Content-Length, then 5 bytes every 0.2 s. Endless and
    trickling answers stop by themselves after ``fault_s`` seconds (or ``endless_bytes``).
    """

    stall_s = 5.0
    fault_s = 10.0
    endless_bytes = 64 << 20

    def __init__(self) -> None:
        self.routes: dict[str, list[tuple]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                server.requests.append(self.path)
                responses = server.routes.get(self.path)
                if not responses:
                    self.send_error(404)
                    return
                kind, payload = responses.pop(0) if len(responses) > 1 else responses[0]
                if kind == "status":
                    self.send_error(payload)
                    return
                self.send_response(200)
                if kind != "endless":
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if kind in ("endless", "trickle"):
                    self.close_connection = True
                    stop, sent = time.monotonic() + server.fault_s, 0
                    try:
                        while time.monotonic() < stop and sent < server.endless_bytes:
                            block = payload if kind == "endless" else payload[sent:sent + 5]
                            if not block:
                                break
                            self.wfile.write(block)
                            sent += len(block)
                            if kind == "trickle":
                                time.sleep(0.2)
                    except OSError:
                        pass  # the client hung up, as it should
                    return
                if kind == "stall":
                    self.wfile.write(payload[:100])
                    self.wfile.flush()
                    time.sleep(server.stall_s)
                    self.close_connection = True
                    return
                self.wfile.write(payload if kind == "ok" else payload[: len(payload) // 2])
                if kind == "truncate":
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server():
    server = FaultyFileServer()
    yield server
    server.close()


@pytest.fixture
def dead_mirror() -> str:
    """A URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


class PeakMemory:
    """Python's peak allocation inside ``with peak_memory:``, in ``.peak_bytes``; tracemalloc stops however it ends."""

    peak_bytes = 0

    def __enter__(self) -> Self:
        tracemalloc.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.peak_bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


@pytest.fixture
def peak_memory() -> PeakMemory:
    return PeakMemory()
