"""Data stage: fetch a dataset's four IDX files from a list of mirrors, checksum-verified.

    python -m weightlapse.pipeline.download --params params.yaml --dataset mnist --out data/mnist

The dataset is a built-in one (pipeline/datasets.py) or one declared under ``datasets`` in
params.yaml, held to the same checksums and sizes; without ``--dataset``, ``data.dataset``.

Mirrors are tried in order: those named in the WEIGHTLAPSE_MIRRORS environment variable
(URLs, file:// URLs or directories, separated by spaces), then the dataset's built-in ones.
Every file is streamed into a temp file beside the target (``.<name>.*.part``) while its
checksum is computed, and moved into place (os.replace) only when the checksum matched; on
any failure the temp file is deleted. A file already present with the right checksum is not
fetched again. Nothing is ever unpickled: the files are IDX, parsed by :mod:`pipeline.idx`.

A mirror is untrusted, so what it can cost is bounded: a file larger than its published
size is cut off there (or refused up front if the server announces it), one file from one
mirror gets ``total_timeout_s`` in all however slowly its bytes trickle, and each read waits
at most ``timeout_s``. Only transient failures (a connection reset or broken off, a stall,
HTTP 5xx or 429) are retried; a name that does not resolve, a refused connection, HTTP 4xx
or a wrong checksum move on to the next mirror at once.

The stage writes only into an ``--out`` that holds nothing but what it writes (the dataset's
files and its own temp files), and refuses any other before fetching, so a mistyped
``--out ~/Documents`` neither deletes nor mixes with anyone's files. ``dvc repro`` removes
the stage's output before running it, so under DVC the directory is always new.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
import urllib3
from tqdm import tqdm

from weightlapse.pipeline.datasets import DATASETS, FILES, DatasetSpec, file_digest
from weightlapse.pipeline.params import ParamsError, load_params

log = logging.getLogger(__name__)

MIRRORS_ENV = "WEIGHTLAPSE_MIRRORS"
RETRIES = 2  # per file and HTTP mirror, on top of the first try; transient failures only
TIMEOUT_S = 60  # for one connect or read
TOTAL_TIMEOUT_S = 600  # for one file from one mirror, retries included: 26 MB at 45 KB/s
RETRY_WAIT_S = 1.0  # doubled after each retry
# Without a published size to hold a file to, the largest published file of any dataset.
MAX_FILE_BYTES = max(size for spec in DATASETS.values() for size in spec.sizes.values())
TEMP_SUFFIX = ".part"
_BLOCK = 1 << 16

HOW_TO_FIX = (
    f"To use a local copy, put the files in a directory and set {MIRRORS_ENV}=/that/dir "
    "(directories, file:// or http(s):// URLs, separated by spaces; tried before the built-in "
    "mirrors). Files are accepted only if their checksums match."
)


class DownloadError(ConnectionError):
    """No mirror gave a file with the expected checksum."""


class OutDirError(FileExistsError):
    """--out holds entries the data stage did not write."""


class MirrorFailure(Exception):
    """One mirror could not give one file: ``reason`` is one line a user can act on."""

    def __init__(self, reason: str, *, transient: bool = False, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.transient = transient  # worth asking the same mirror again
        self.unreachable = unreachable  # not worth asking this mirror for the other files


def mirror_list(spec: DatasetSpec, env: str | None = None) -> list[str]:
    """The user's mirrors (from WEIGHTLAPSE_MIRRORS) first, then the built-in ones."""
    extra = (env if env is not None else os.environ.get(MIRRORS_ENV, "")).split()
    mirrors = []
    for mirror in [*extra, *spec.mirrors]:
        if mirror not in mirrors:
            mirrors.append(mirror)
    return mirrors


def fetch_dataset(
    spec: DatasetSpec, out_dir: str | Path, *, mirrors: list[str], retries: int = RETRIES,
    timeout_s: float = TIMEOUT_S, total_timeout_s: float = TOTAL_TIMEOUT_S, progress: bool = True,
) -> dict[str, Path]:
    """Make ``out_dir`` hold every file of ``spec`` with its published checksum and size."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Try every file before giving up, so one run fetches all that can be had and the
    # error lists everything still missing; a mirror that could not be reached is not
    # asked again for the other files.
    fetched, failures, unreachable = {}, [], set()
    for name in FILES:
        try:
            fetched[name] = _fetch(name, spec.checksums[name], out_dir, mirrors=mirrors, retries=retries,
                                   max_bytes=spec.sizes[name], timeout_s=timeout_s,
                                   total_timeout_s=total_timeout_s, progress=progress, unreachable=unreachable)
        except DownloadError as error:
            failures.append(str(error))
    if failures:
        missing = [name for name in FILES if name not in fetched]
        raise DownloadError(f"{spec.name}: could not fetch {', '.join(missing)}.\n"
                            + "\n".join(failures) + "\n" + HOW_TO_FIX + spec.offline_hint)
    return fetched


def fetch_file(
    name: str, checksum: str, out_dir: Path, *, mirrors: list[str], retries: int = RETRIES,
    max_bytes: int = MAX_FILE_BYTES, timeout_s: float = TIMEOUT_S, total_timeout_s: float = TOTAL_TIMEOUT_S,
    progress: bool = True,
) -> Path:
    """Make ``out_dir / name`` hold the file with ``checksum`` ("sha256:..." or "md5:..."),
    of at most ``max_bytes`` (its published size)."""
    try:
        return _fetch(name, checksum, Path(out_dir), mirrors=mirrors, retries=retries, max_bytes=max_bytes,
                      timeout_s=timeout_s, total_timeout_s=total_timeout_s, progress=progress, unreachable=set())
    except DownloadError as error:
        raise DownloadError(f"{error}\n{HOW_TO_FIX}") from None


def _fetch(name: str, checksum: str, out_dir: Path, *, mirrors: list[str], retries: int, max_bytes: int,
           timeout_s: float, total_timeout_s: float, progress: bool, unreachable: set[str]) -> Path:
    target = out_dir / name
    if target.is_file() and _matches(target, checksum):
        log.info("%s: already present with the right checksum", target)
        return target
    failures = []
    for mirror in mirrors:
        if mirror in unreachable:
            failures.append(f"  {mirror}: skipped, unreachable for an earlier file")
            continue
        try:
            if _is_http(mirror):
                _fetch_http(mirror.rstrip("/") + "/" + name, target, checksum, max_bytes=max_bytes, retries=retries,
                            timeout_s=timeout_s, total_timeout_s=total_timeout_s, progress=progress)
            else:
                _copy_local(_local_path(mirror) / name, target, checksum, max_bytes=max_bytes, progress=progress)
        except Exception as error:  # noqa: BLE001 - every failure moves on to the next mirror
            failure = _as_failure(error, mirror, timeout_s)
            if failure.unreachable:
                unreachable.add(mirror)
            log.warning("%s from %s failed: %s", name, mirror, failure)
            failures.append(f"  {mirror}: {failure}")
            continue
        log.info("%s: verified (%s) from %s", name, checksum.split(":")[0], mirror)
        return target
    raise DownloadError(f"could not get {name} ({checksum}) from any mirror:\n" + "\n".join(failures))


def _fetch_http(url: str, target: Path, checksum: str, *, max_bytes: int, retries: int, timeout_s: float,
                total_timeout_s: float, progress: bool) -> None:
    deadline = time.monotonic() + total_timeout_s
    for attempt in range(retries + 1):
        try:
            return _download(url, target, checksum, max_bytes=max_bytes, timeout_s=timeout_s, deadline=deadline,
                             total_timeout_s=total_timeout_s, progress=progress)
        except Exception as error:  # noqa: BLE001 - sorted into transient or not
            failure = _as_failure(error, url, timeout_s)
            wait = RETRY_WAIT_S * 2**attempt
            if not failure.transient or attempt == retries or time.monotonic() + wait >= deadline:
                raise failure from None
            log.warning("%s: %s; trying again in %g s", url, failure, wait)
            time.sleep(wait)


def _download(url: str, target: Path, checksum: str, *, max_bytes: int, timeout_s: float, deadline: float,
              total_timeout_s: float, progress: bool) -> None:
    host = urlparse(url).netloc
    read_timeout = max(0.1, min(timeout_s, deadline - time.monotonic()))
    # identity: the bytes stored are the bytes published, never decompressed on the way.
    with requests.Session() as session, session.get(url, stream=True, timeout=(timeout_s, read_timeout),
                                                    headers={"Accept-Encoding": "identity"}) as response:
        response.raise_for_status()
        announced = response.headers.get("Content-Length", "")
        announced = int(announced) if announced.isdigit() else None
        if announced is not None and announced > max_bytes:
            raise MirrorFailure(f"{host} announces {announced:,} bytes, more than the {max_bytes:,} of the "
                                "published file; not the dataset file")
        blocks = _bounded_blocks(response.raw, host=host, max_bytes=max_bytes, announced=announced,
                                 deadline=deadline, total_timeout_s=total_timeout_s)
        _write_verified(blocks, target, checksum, source=url, total=announced, progress=progress)


def _bounded_blocks(raw, *, host: str, max_bytes: int, announced: int | None, deadline: float,
                    total_timeout_s: float) -> Iterator[bytes]:
    """The body as it arrives, cut off past ``max_bytes`` or ``deadline``."""
    # read1 returns what has arrived, so a trickle meets the deadline check; read() would wait for a full block.
    read = getattr(raw, "read1", raw.read)  # urllib3 >= 2.3
    received = 0
    while block := read(min(_BLOCK, max_bytes + 1 - received), decode_content=False):
        received += len(block)
        if received > max_bytes:
            raise MirrorFailure(f"{host} sent more than the {max_bytes:,} bytes of the published file; "
                                "cut off there (not the dataset file, or a broken mirror)")
        if time.monotonic() > deadline:
            raise MirrorFailure(f"{host} sent only {received:,} bytes in {total_timeout_s:g} s, the limit for one "
                                "file; cut off (too slow: try another mirror)", unreachable=True)
        yield block
    if announced is not None and received != announced:
        raise MirrorFailure(f"the connection broke off mid-file ({received:,} of {announced:,} bytes)",
                            transient=True)


def _copy_local(source: Path, target: Path, checksum: str, *, max_bytes: int, progress: bool) -> None:
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    size = source.stat().st_size
    if size > max_bytes:
        raise MirrorFailure(f"{source} is {size:,} bytes, more than the {max_bytes:,} of the published file; "
                            "not the dataset file")
    with open(source, "rb") as stream:
        _write_verified(iter(lambda: stream.read(1 << 20), b""), target, checksum, source=str(source), total=size,
                        progress=progress)


def _write_verified(blocks: Iterable[bytes], target: Path, checksum: str, *, source: str, total: int | None,
                    progress: bool) -> None:
    """Write ``blocks`` to a temp file beside ``target`` and move it into place only if ``checksum`` matches."""
    algorithm, expected = checksum.split(":", 1)
    digest = hashlib.new(algorithm)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=target.name,
                                              disable=not progress, leave=False) as bar:
            for block in blocks:
                digest.update(block)
                out.write(block)
                bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected:
            raise MirrorFailure(f"{source}: {algorithm} is {digest.hexdigest()}, expected {expected}; "
                                "the copy is corrupt or a different file")
        os.replace(temp_name, target)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)


def _as_failure(error: Exception, mirror: str, timeout_s: float) -> MirrorFailure:
    """Sort an error into one line a user can act on, and whether retrying or asking again may help."""
    if isinstance(error, MirrorFailure):
        return error
    host = urlparse(mirror).netloc
    text = str(error)
    if isinstance(error, requests.HTTPError) and error.response is not None:
        code = error.response.status_code
        return MirrorFailure(f"HTTP {code} {error.response.reason}", transient=code >= 500 or code == 429)
    if _cannot_resolve(error):
        return MirrorFailure(f"cannot resolve {host} (no network, or no DNS?); not retried", unreachable=True)
    # A stall mid-file is urllib3's read timeout, bare or wrapped in a requests.ConnectionError.
    if isinstance(error, (requests.Timeout, urllib3.exceptions.TimeoutError)) or "timed out" in text.lower():
        return MirrorFailure(f"no answer from {host} within {timeout_s:g} s", transient=True, unreachable=True)
    if isinstance(error, requests.ConnectionError) and "refused" in text:
        return MirrorFailure(f"{host} refused the connection", unreachable=True)
    if isinstance(error, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                          urllib3.exceptions.ProtocolError)):
        if "reset" in text or "aborted" in text or "broken" in text.lower() or "IncompleteRead" in text:
            return MirrorFailure("the connection broke off mid-file", transient=True)
        return MirrorFailure(f"cannot connect to {host}", transient=True, unreachable=True)
    if isinstance(error, (requests.RequestException, urllib3.exceptions.HTTPError)):
        return MirrorFailure(f"request failed: {type(error).__name__}")
    return MirrorFailure(text.strip().splitlines()[0] if text.strip() else type(error).__name__)


def _cannot_resolve(error: BaseException | None) -> bool:
    """Whether a name lookup failed, looking through requests' and urllib3's wrappers."""
    for _ in range(8):
        if error is None:
            return False
        if isinstance(error, (socket.gaierror, urllib3.exceptions.NameResolutionError)):
            return True
        inner = getattr(error, "reason", None)
        if inner is None and error.args and isinstance(error.args[0], BaseException):
            inner = error.args[0]
        error = inner if isinstance(inner, BaseException) else error.__cause__
    return False


def _is_http(mirror: str) -> bool:
    return urlparse(mirror).scheme in ("http", "https")


def _local_path(mirror: str) -> Path:
    parsed = urlparse(mirror)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
        raise ValueError(f"unsupported mirror scheme {parsed.scheme!r}; use http(s)://, file:// or a directory")
    return Path(mirror).expanduser()


def _matches(path: Path, checksum: str) -> bool:
    algorithm, expected = checksum.split(":", 1)
    return file_digest(path, algorithm) == expected


def _is_own_temp(name: str) -> bool:
    return name.endswith(TEMP_SUFFIX) and any(name.startswith(f".{file}.") for file in FILES)


def prepare_out_dir(out_dir: Path) -> None:
    """Refuse an ``out_dir`` holding anything the stage did not write; delete its own stale temp files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutDirError(f"{out_dir} is a file, not a directory; choose an empty or new directory for --out")
    if not out_dir.exists():
        return
    entries = sorted(out_dir.iterdir())
    foreign = [path.name for path in entries
               if path.is_dir() or not (path.name in FILES or _is_own_temp(path.name))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutDirError(f"{out_dir} holds files the data stage did not write ({shown}); choose an empty or new "
                          "directory for --out (the stage deletes nothing it did not make)")
    for path in entries:
        if _is_own_temp(path.name):
            log.info("removing %s, left by an interrupted download", path)
            path.unlink()


def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (reads data.dataset and datasets)")
    parser.add_argument("--dataset", default=None,
                        help="the dataset to fetch: built in, or declared under datasets (default: data.dataset)")
    parser.add_argument("--out", required=True, help="new or empty directory to hold the dataset's files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.out)
    try:
        params = load_params(args.params)
        name = args.dataset or params.data.dataset
        if name not in params.datasets:
            raise ParamsError(f"--dataset {name}: {args.params} neither declares it under datasets nor trains a run "
                              f"on it; choose one of {', '.join(params.datasets)}")
        spec = params.datasets[name]
        prepare_out_dir(out_dir)
        fetch_dataset(spec, out_dir, mirrors=mirror_list(spec), progress=True)
    except (ParamsError, FileNotFoundError, DownloadError, OutDirError) as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
