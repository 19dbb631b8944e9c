"""Outages: the database goes away under load and comes back.

PostgreSQL: the shared server is not touched. A TCP proxy (`faults.TcpProxy`)
stands between the log server and PostgreSQL; cutting it aborts every
connection and refuses new ones, which is what the log server sees when
PostgreSQL restarts or the network to it fails. While it is down,
submissions must get 503 with Retry-After and the server must stay up;
once it is back the server must recover by itself, and nothing acknowledged
may be lost.

SQLite: the data directory is a small tmpfs. Filling it makes every write
fail with "database or disk is full"; freeing it must let the same server
go on, with nothing lost and the database intact.

The HSM outages (session failure, token gone) are covered by
tests/test_hsm_server.py.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults import (
    Client,
    Ledger,
    Load,
    TcpProxy,
    check_log,
    env_int,
    figures_line,
    pg_dsn_via,
    request_body,
)
from tests.serverproc import ServerProcess

ORIGIN = "outage.example/log"


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _until_logged(
    server: ServerProcess, ledger: Ledger, tag: str, limit: float = 30.0
) -> float:
    """Seconds until a fresh submission is logged again; fails after `limit`."""
    client = Client(server.url, server.token, timeout=15)
    began = time.monotonic()
    try:
        for n in range(10_000):
            status = ledger.submit(client, request_body(tag, n))
            if status == 201:
                return time.monotonic() - began
            assert status in (None, 503), status
            assert time.monotonic() - began < limit, f"not recovered in {limit} s"
            time.sleep(0.05)
    finally:
        client.close()
    raise AssertionError("unreachable")


def _no_errors(log: str) -> None:
    """No unhandled error or ERROR line in a server log (warnings are fine)."""
    assert "unhandled error" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]


def test_postgres_outage_under_load(pg_schema_url: str, tmp_path: Path) -> None:
    outages = env_int("LOGSIGN_OUTAGES", 3)
    pg = urllib.parse.urlsplit(pg_schema_url)
    ledger = Ledger()
    recoveries: list[float] = []
    with TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432) as proxy:
        database = pg_dsn_via(pg_schema_url, proxy.port)
        server = ServerProcess(
            tmp_path / "data", "--origin", ORIGIN, "--database", database
        )
        probe = Client(server.url, server.token, timeout=15)
        with Load(server.url, server.token, ledger, "pg", threads=4):
            for outage in range(outages):
                time.sleep(1.0)
                proxy.cut()
                time.sleep(1.0)
                # Down: writes are 503 with Retry-After, reads that need the
                # database too, and the server itself answers.
                body = request_body(f"down{outage}", 0)
                status, answer, headers = probe.post("api/v1/entries", body)
                assert status == 503, answer
                assert headers["retry-after"].isdigit(), headers
                assert answer["error"]["code"] == "unavailable"
                ledger.sent += 1
                ledger.doubt([body])
                status, read_headers, read = _get(server.url + "api/v1/entries/0")
                assert status == 503 and read_headers["Retry-After"].isdigit(), read
                assert _get(server.url + "healthz")[0] == 200
                assert _get(server.url + "checkpoint")[0] == 200
                proxy.restore()
                recoveries.append(_until_logged(server, ledger, f"up{outage}"))
            time.sleep(1.0)
        probe.close()
        assert server.proc.poll() is None, "the server died during an outage"
        ledger.retry_in_doubt(server.url, server.token)
        vkey = (tmp_path / "data" / "public" / "log.vkey").read_text().strip()
        view = check_log(server.url, vkey, ledger)
        assert server.stop() == 0
    assert ledger.statuses["503"] > 0, ledger.statuses
    _no_errors(server.log.read_text())
    figures_line(
        f"outage[postgresql]: {outages} cuts of ~1 s under load (4 clients), "
        f"{ledger.sent} submitted, {len(ledger.acks)} in the log "
        f"({len(ledger.acks) - ledger.retried} acknowledged under load, "
        f"{ledger.retried} in doubt and sent again, {ledger.found} found logged), "
        f"0 lost; answers {dict(ledger.statuses)}; recovered in "
        f"{', '.join(f'{r:.2f}' for r in recoveries)} s; "
        f"{view.leaves} leaves audited; {proxy.connections} database connections"
    )


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[None]:
    """A tmpfs of `size` mounted at `path` (needs root and CAP_SYS_ADMIN)."""
    path.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs"]
    try:
        subprocess.run(
            [*command, str(path)], check=True, capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError) as exc:
        reason = getattr(exc, "stderr", b"") or str(exc)
        pytest.skip(f"cannot mount a size-limited tmpfs here: {reason!r}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=10)


def _fill(path: Path, leave: int) -> int:
    """Fill the file system holding `path` until `leave` bytes are free."""
    written = 0
    with path.open("wb") as out:
        while True:
            stat = os.statvfs(path.parent)
            free = stat.f_bavail * stat.f_frsize
            if free <= leave:
                return written
            chunk = min(1 << 20, free - leave)
            try:
                out.write(b"\0" * chunk)
                out.flush()
            except OSError:
                return written
            written += chunk


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_sqlite_full_disk(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ledger = Ledger()
    with small_filesystem(data, "16m"):
        server = ServerProcess(data, "--origin", ORIGIN)
        filler = data / "filler"
        with Load(server.url, server.token, ledger, "disk", threads=4):
            time.sleep(0.5)
            _fill(filler, 64 << 10)
            deadline = time.monotonic() + 30
            while ledger.statuses["503"] < 20:
                assert time.monotonic() < deadline, ledger.statuses
                time.sleep(0.1)
            full_503 = ledger.statuses["503"]
            assert server.proc.poll() is None, "the server died on a full disk"
            assert _get(server.url + "healthz")[0] == 200
            filler.unlink()
            recovered = _until_logged(server, ledger, "space")
            time.sleep(0.5)
        first_log = server.log.read_text()
        assert "disk is full" in first_log
        ledger.retry_in_doubt(server.url, server.token)
        vkey = (data / "public" / "log.vkey").read_text().strip()
        check_log(server.url, vkey, ledger)
        assert server.stop() == 0

        with sqlite3.connect(data / "log.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # And it starts again on the same file with everything in it.
        server = ServerProcess(data, "--origin", ORIGIN)
        view = check_log(server.url, vkey, ledger)
        assert server.stop() == 0
        with sqlite3.connect(data / "log.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # The full disk is answered, not crashed on.
        _no_errors(first_log + server.log.read_text())

    figures_line(
        f"outage[sqlite full disk]: 16 MiB tmpfs filled to 64 KiB free under "
        f"load (4 clients), {full_503} answers 503 while full, "
        f"{ledger.sent} submitted, {len(ledger.acks)} in the log "
        f"({ledger.retried} in doubt and sent again, {ledger.found} found logged), "
        f"0 lost; recovered {recovered:.2f} s after space was freed; "
        f"integrity_check ok; {view.leaves} leaves audited after a restart; "
        f"answers {dict(ledger.statuses)}"
    )
