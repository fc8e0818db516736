"""Data stage: fetch a dataset's four IDX files from a list of mirrors, checksum-verified.

    python -m pipeline.download --params params.yaml --out data/mnist

Mirrors are tried in order: those named in the WEIGHTLAPSE_MIRRORS environment variable
(URLs, file:// URLs or directories, separated by spaces), then the dataset's built-in ones.
HTTP(S) goes through pooch, which retries, shows progress, and moves a file into place only
after its checksum matched; local mirrors are copied the same way (temp file, verify,
os.replace). A file already present with the right checksum is not fetched again. Nothing
is ever unpickled: the files are IDX, parsed by :mod:`pipeline.idx`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import pooch
import requests
from tqdm import tqdm

from pipeline.datasets import DATASETS, FILES, DatasetSpec, file_digest
from pipeline.params import ParamsError, load_params

log = logging.getLogger(__name__)

MIRRORS_ENV = "WEIGHTLAPSE_MIRRORS"
RETRIES = 2  # per file and HTTP mirror, on top of the first try
TIMEOUT_S = 60


HOW_TO_FIX = (
    f"To use a local copy, put the files in a directory and set {MIRRORS_ENV}=/that/dir "
    "(directories, file:// or http(s):// URLs, separated by spaces; tried before the built-in "
    "mirrors). Files are accepted only if their checksums match."
)


class DownloadError(ConnectionError):
    """No mirror gave a file with the expected checksum."""


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
    timeout_s: float = TIMEOUT_S, progress: bool = True,
) -> dict[str, Path]:
    """Make ``out_dir`` hold every file of ``spec`` with its published checksum."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Try every file before giving up, so one run fetches all that can be had and the
    # error lists everything still missing; a mirror that could not be reached is not
    # asked again for the other files.
    fetched, failures, unreachable = {}, [], set()
    for name in FILES:
        try:
            fetched[name] = _fetch(name, spec.checksums[name], out_dir, mirrors=mirrors, retries=retries,
                                   timeout_s=timeout_s, progress=progress, unreachable=unreachable)
        except DownloadError as error:
            failures.append(str(error))
    if failures:
        missing = [name for name in FILES if name not in fetched]
        raise DownloadError(f"{spec.name}: could not fetch {', '.join(missing)}.\n"
                            + "\n".join(failures) + "\n" + HOW_TO_FIX + spec.offline_hint)
    return fetched


def fetch_file(
    name: str, checksum: str, out_dir: Path, *, mirrors: list[str], retries: int = RETRIES,
    timeout_s: float = TIMEOUT_S, progress: bool = True,
) -> Path:
    """Make ``out_dir / name`` hold the file with ``checksum`` ("sha256:..." or "md5:...")."""
    try:
        return _fetch(name, checksum, out_dir, mirrors=mirrors, retries=retries, timeout_s=timeout_s,
                      progress=progress, unreachable=set())
    except DownloadError as error:
        raise DownloadError(f"{error}\n{HOW_TO_FIX}") from None


def _fetch(name: str, checksum: str, out_dir: Path, *, mirrors: list[str], retries: int,
           timeout_s: float, progress: bool, unreachable: set[str]) -> Path:
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
                _fetch_http(mirror, name, checksum, out_dir, retries=retries, timeout_s=timeout_s,
                            progress=progress)
            else:
                _copy_local(_local_path(mirror) / name, target, checksum, progress=progress)
        except Exception as error:  # noqa: BLE001 - every failure moves on to the next mirror
            if isinstance(error, (requests.ConnectionError, requests.Timeout)):
                unreachable.add(mirror)
            reason = _short_reason(error, mirror, timeout_s)
            log.warning("%s from %s failed: %s", name, mirror, reason)
            failures.append(f"  {mirror}: {reason}")
            continue
        log.info("%s: verified (%s) from %s", name, checksum.split(":")[0], mirror)
        return target
    raise DownloadError(f"could not get {name} ({checksum}) from any mirror:\n" + "\n".join(failures))


def _short_reason(error: Exception, mirror: str, timeout_s: float) -> str:
    """One line a user can act on, instead of a urllib3 traceback summary."""
    host = urlparse(mirror).netloc
    text = str(error)
    # A stall mid-file surfaces as a ConnectionError wrapping urllib3's read timeout.
    if isinstance(error, requests.Timeout) or "timed out" in text.lower():
        return f"no answer from {host} within {timeout_s:g} s"
    if isinstance(error, requests.HTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code} {error.response.reason}"
    if isinstance(error, requests.ConnectionError):
        if "resolve" in text:
            return f"cannot resolve {host} (no network, or no DNS?)"
        if "refused" in text:
            return f"{host} refused the connection"
        if "IncompleteRead" in text or "Connection broken" in text:
            return "the connection broke off mid-file"
        return f"cannot connect to {host}"
    if isinstance(error, requests.RequestException):
        return f"request failed: {type(error).__name__}"
    # pooch's hash mismatch ends with advice that does not apply here; keep the facts.
    return text.split(". Deleted download")[0].strip().splitlines()[0] if text.strip() else type(error).__name__


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


def _fetch_http(mirror: str, name: str, checksum: str, out_dir: Path, *, retries: int,
                timeout_s: float, progress: bool) -> None:
    # pooch downloads to a temp file beside the target, checks the hash, then renames.
    fetcher = pooch.create(
        path=out_dir, base_url=mirror.rstrip("/") + "/", registry={name: checksum},
        retry_if_failed=retries,
    )
    downloader = pooch.HTTPDownloader(progressbar=progress, timeout=timeout_s)
    fetcher.fetch(name, downloader=downloader)


def _copy_local(source: Path, target: Path, checksum: str, *, progress: bool) -> None:
    if not source.is_file():
        raise FileNotFoundError(f"{source} does not exist")
    algorithm, expected = checksum.split(":", 1)
    digest = hashlib.new(algorithm)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst, tqdm(
            total=source.stat().st_size, unit="B", unit_scale=True, desc=target.name,
            disable=not progress, leave=False,
        ) as bar:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
                bar.update(len(block))
            dst.flush()
            os.fsync(dst.fileno())
        if digest.hexdigest() != expected:
            raise ValueError(
                f"{source}: {algorithm} is {digest.hexdigest()}, expected {expected}; "
                "the copy is corrupt or a different file"
            )
        os.replace(temp_name, target)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="params file (reads data.dataset)")
    parser.add_argument("--out", required=True, help="directory to hold the dataset's files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.out)
    try:
        spec = DATASETS[load_params(args.params).data.dataset]
        fetch_dataset(spec, out_dir, mirrors=mirror_list(spec), progress=True)
    except (ParamsError, FileNotFoundError, DownloadError) as error:
        log.error("%s", error)
        return 1
    _remove_strays(out_dir)
    return 0


def _remove_strays(out_dir: Path) -> None:
    """Leave only the dataset's files in the stage output (no temp files from a crash)."""
    for path in out_dir.iterdir():
        if path.name not in FILES:
            log.info("removing stray %s", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


if __name__ == "__main__":
    sys.exit(main())
