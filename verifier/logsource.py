"""Reading a log's files: the checkpoint, tiles and entry bundles.

`HttpLog` reads a log served over HTTP(S), `DirectoryLog` one written as
static files; `open_log` picks by location. Nothing read here is trusted:
callers authenticate what they read against a verified checkpoint.
"""

from __future__ import annotations

import http.client
import os
import threading
import time
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from verifier.tiles import MAX_BUNDLE_SIZE


class FetchError(Exception):
    """The log could not be read: unreachable, an HTTP error or a missing file.

    Not a verification failure: nothing was learned about the data.
    """


class NotFound(FetchError):
    """The log has no such file (HTTP 404 or a missing file)."""


class LogSource(Protocol):
    """Reads a log's files by path, such as "checkpoint" or "tile/0/001"."""

    def read(self, path: str) -> bytes: ...

    def read_many(self, paths: Sequence[str]) -> list[bytes]: ...

    def close(self) -> None: ...


class DirectoryLog:
    """A log written as static files, read straight from disk."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise ValueError(f"{root} is not a directory")
        self.root = root

    def __repr__(self) -> str:
        return f"DirectoryLog({str(self.root)!r})"

    def read(self, path: str) -> bytes:
        if path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"not a log path: {path!r}")
        try:
            with (self.root / path).open("rb") as f:
                # read() sizes its buffer from the file; read(limit) would
                # allocate the whole limit for every file.
                if os.fstat(f.fileno()).st_size > MAX_BUNDLE_SIZE:
                    raise FetchError(f"{self.root / path} is too large")
                return f.read()
        except FileNotFoundError as e:
            raise NotFound(f"{path} is missing from {self.root}") from e
        except OSError as e:
            raise FetchError(f"cannot read {self.root / path}: {e}") from e

    def read_many(self, paths: Sequence[str]) -> list[bytes]:
        return [self.read(path) for path in paths]

    def close(self) -> None:
        pass


class HttpLog:
    """A log read over HTTP(S), with keep-alive connections, one per thread.

    `read_many` fetches concurrently on a small thread pool. Transient
    failures (a dropped keep-alive connection, 429, 502 to 504) are retried a
    few times; other statuses raise FetchError, 404 raises NotFound.
    """

    RETRIES = 4

    def __init__(self, url: str, *, timeout: float = 30.0, workers: int = 8) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url if url.endswith("/") else url + "/"
        self._parts = urllib.parse.urlsplit(self.url)
        self._timeout = timeout
        self._workers = workers
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []
        self._pool: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"HttpLog({self.url!r})"

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            host, port = self._parts.hostname or "", self._parts.port
            if self._parts.scheme == "https":
                conn = http.client.HTTPSConnection(host, port, timeout=self._timeout)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def read(self, path: str) -> bytes:
        target = self._parts.path + path
        for attempt in range(self.RETRIES + 1):
            last = attempt == self.RETRIES
            try:
                conn = self._connection()
                conn.request("GET", target, headers={"User-Agent": "logsign-verifier"})
                response = conn.getresponse()
                body = _read_body(response)
                if not response.isclosed():
                    self._drop_connection()
            except (OSError, http.client.HTTPException) as e:
                self._drop_connection()
                if last:
                    raise FetchError(f"cannot read {self.url}{path}: {e}") from e
                time.sleep(0.05 * 2**attempt)
                continue
            if response.status == 200:
                if len(body) > MAX_BUNDLE_SIZE:
                    raise FetchError(f"{self.url}{path}: response is too large")
                return body
            if response.status == 404:
                raise NotFound(f"{self.url}{path}: 404 not found")
            if response.status in (429, 502, 503, 504) and not last:
                time.sleep(min(5.0, _retry_after(response) or 0.1 * 2**attempt))
                continue
            raise FetchError(f"{self.url}{path}: HTTP {response.status}")
        raise AssertionError("unreachable")

    def read_many(self, paths: Sequence[str]) -> list[bytes]:
        if len(paths) <= 1:
            return [self.read(path) for path in paths]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, "logsign-fetch")
        return list(self._pool.map(self.read, paths))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


def _read_body(response: http.client.HTTPResponse) -> bytes:
    """The body, or its first MAX_BUNDLE_SIZE + 1 bytes if it is longer.

    read(limit) would allocate the whole limit for every response, so read
    by Content-Length when the server sends one, else in pieces.
    """
    if response.length is not None and response.length <= MAX_BUNDLE_SIZE:
        return response.read()
    pieces, size = [], 0
    while size <= MAX_BUNDLE_SIZE and (piece := response.read1(1 << 16)):
        pieces.append(piece)
        size += len(piece)
    return b"".join(pieces)


def _retry_after(response: http.client.HTTPResponse) -> float | None:
    value = response.getheader("Retry-After", "")
    return float(value) if value.isdigit() else None


def open_log(location: str) -> DirectoryLog | HttpLog:
    """An http(s) URL, a file: URL or a directory path."""
    if location.startswith(("http://", "https://")):
        return HttpLog(location)
    if location.startswith("file:"):
        location = urllib.parse.unquote(urllib.parse.urlsplit(location).path)
    return DirectoryLog(Path(location))
