"""Content-addressed download cache.

Layout: ``<root>/sha256/<hex>``; a file is only ever placed there after its
SHA-256 was verified, via an atomic rename, and it is made read-only.
Temporary files live next to it (``<root>/sha256/.partial-*``) and are
always removed on failure.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import requests
from tqdm import tqdm

from builder.errors import DownloadError, IntegrityError

__all__ = ["Cache", "default_cache_dir", "download_bytes", "sha256_file"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 15  # seconds
READ_TIMEOUT = 60  # seconds between two received chunks
RETRIES = 2  # extra attempts after a connection error or timeout
_CHUNK = 1 << 16
_HEX64 = re.compile(r"[0-9a-f]{64}")


def default_cache_dir() -> Path:
    """``$DIRTYLOG_CACHE``, else ``$XDG_CACHE_HOME/dirtylog``, else ``~/.cache/dirtylog``."""
    if os.environ.get("DIRTYLOG_CACHE"):
        return Path(os.environ["DIRTYLOG_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "dirtylog"
    return Path.home() / ".cache" / "dirtylog"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_hex(sha256: str) -> str:
    s = sha256.lower()
    if not _HEX64.fullmatch(s):
        raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
    return s


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _get(url: str, *, stream: bool) -> requests.Response:
    """GET with retries on connection errors/timeouts; raises DownloadError."""
    last: Exception | None = None
    for attempt in range(RETRIES + 1):
        if attempt:
            time.sleep(0.5 * attempt)
            log.info("retrying %s (attempt %d/%d)", url, attempt + 1, RETRIES + 1)
        try:
            resp = requests.get(url, stream=stream, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        except (requests.ConnectionError, requests.Timeout) as e:
            last = e
            continue
        except requests.RequestException as e:
            raise DownloadError(f"cannot download {url}: {_one_line(e)}") from e
        if resp.status_code != 200:
            resp.close()
            raise DownloadError(f"cannot download {url}: HTTP {resp.status_code} {resp.reason}")
        return resp
    raise DownloadError(
        f"cannot download {url} after {RETRIES + 1} attempts: {_one_line(last)}"
    ) from last


def download_bytes(url: str, max_bytes: int = 64 << 20) -> bytes:
    """Download a small, not-yet-authenticated file (e.g. InRelease) into memory."""
    resp = _get(url, stream=True)
    buf = bytearray()
    try:
        for chunk in resp.iter_content(_CHUNK):
            buf += chunk
            if len(buf) > max_bytes:
                raise DownloadError(f"cannot download {url}: larger than {max_bytes} bytes")
    except requests.RequestException as e:
        raise DownloadError(f"cannot download {url}: {_one_line(e)}") from e
    finally:
        resp.close()
    return bytes(buf)


class Cache:
    """A content-addressed store of verified files."""

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r})"

    @property
    def _dir(self) -> Path:
        return self.root / "sha256"

    def path_for(self, sha256: str) -> Path:
        """Where the file with this hash lives (whether or not it is present)."""
        return self._dir / _check_hex(sha256)

    def get(self, sha256: str) -> Path | None:
        """The cached file with this hash, re-verified; None if absent or corrupted.

        A corrupted file is deleted so that it is downloaded again.
        """
        path = self.path_for(sha256)
        if not path.is_file():
            return None
        actual = sha256_file(path)
        if actual != sha256.lower():
            log.warning("cache file %s is corrupted (sha256 %s); removing it", path, actual)
            path.unlink(missing_ok=True)
            return None
        return path

    def put_from_download(
        self, url: str, sha256: str, size: int | None = None, progress: bool = True
    ) -> Path:
        """Download *url* into the cache, verifying it has *sha256* (and *size*).

        Returns the cached path.  If the file is already cached (and intact)
        nothing is downloaded.  On a hash or size mismatch nothing is left in
        the cache and IntegrityError is raised; network failures raise
        DownloadError.  The progress bar appears only when *progress* is true
        and stderr is a terminal.
        """
        expected = _check_hex(sha256)
        cached = self.get(expected)
        if cached is not None:
            return cached
        self._dir.mkdir(parents=True, exist_ok=True)
        final = self.path_for(expected)

        resp = _get(url, stream=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".partial-", dir=self._dir)
        tmp = Path(tmp_name)
        try:
            h = hashlib.sha256()
            n = 0
            total = size if size is not None else _content_length(resp)
            with os.fdopen(fd, "wb") as out, tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=url.rsplit("/", 1)[-1][:40],
                leave=False,
                disable=not (progress and sys.stderr.isatty()),
            ) as bar:
                try:
                    for chunk in resp.iter_content(_CHUNK):
                        n += len(chunk)
                        if size is not None and n > size:
                            raise IntegrityError(
                                f"{url}: more than the expected {size} bytes; "
                                f"expected sha256 {expected}"
                            )
                        h.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
                except requests.RequestException as e:
                    raise DownloadError(f"cannot download {url}: {_one_line(e)}") from e
                out.flush()
                os.fsync(out.fileno())
            actual = h.hexdigest()
            if size is not None and n != size:
                raise IntegrityError(
                    f"{url}: size {n} bytes, expected {size}; expected sha256 {expected}, "
                    f"actual {actual}"
                )
            if actual != expected:
                raise IntegrityError(
                    f"{url}: sha256 mismatch: expected {expected}, actual {actual}"
                )
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            resp.close()
        return final


def _content_length(resp: requests.Response) -> int | None:
    try:
        return int(resp.headers["Content-Length"])
    except (KeyError, ValueError):
        return None
