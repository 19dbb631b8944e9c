"""Overload: a bounded queue, a clean stop, and clients that hog connections.

1. Submissions beyond `sequencer.max_pending` are answered 503 with
   Retry-After at once; the queue, and the server's memory, stay bounded.
2. SIGTERM answers every submission already accepted (the batch in flight
   and the queue behind it), then exits 0; nothing acknowledged is lost.
3. Hundreds of idle connections, clients that send their request head a
   byte at a time, and clients that stall in the middle of a body do not
   keep other clients from being served, and are closed by the server
   (`idle_timeout_seconds`, `body_timeout_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp

from tests.faults import (
    Client,
    Ledger,
    Load,
    check_log,
    figures_line,
    request_body,
)
from tests.serverproc import ServerProcess

ORIGIN = "overload.example/log"


def _server(tmp_path: Path, config: str) -> ServerProcess:
    path = tmp_path / "logserver.toml"
    path.write_text(config)
    return ServerProcess(tmp_path / "data", "--origin", ORIGIN, "--config", str(path))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _vkey(server: ServerProcess) -> str:
    return (server.data / "public" / "log.vkey").read_text().strip()


async def test_full_queue_answers_503_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    max_pending = 64
    server = _server(
        tmp_path,
        f"[sequencer]\nmax_pending = {max_pending}\nlinger_ms = 100\nmax_batch = 32\n",
    )
    ledger = Ledger()
    headers = {"Authorization": f"Bearer {server.token}"}
    seconds, clients = 2.5, 200
    statuses: Counter[int] = Counter()
    bad_503: list[str] = []
    refused: set[str] = set()
    pending_seen: list[int] = []
    rss_before = _rss_kib(server.proc.pid)
    deadline = time.monotonic() + seconds

    async def flood(session: aiohttp.ClientSession, worker: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            body = request_body(f"flood{worker}", n)
            n += 1
            ledger.sent += 1
            async with session.post(
                server.url + "api/v1/entries", json=body, headers=headers
            ) as response:
                answer = await response.json()
                statuses[response.status] += 1
                if response.status == 201:
                    ledger.acknowledge(body, answer)
                elif response.status == 503:
                    refused.add(body["artifact"]["sha256"])
                    message = answer["error"]["message"]
                    if response.headers.get("Retry-After") != "1" or (
                        "too many submissions are waiting" not in message
                    ):
                        bad_503.append(f"{dict(response.headers)} {message}")
                else:
                    raise AssertionError((response.status, answer))

    async def watch(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            async with session.get(server.url + "healthz") as response:
                pending_seen.append((await response.json())["pending"])
            await asyncio.sleep(0.05)

    connector = aiohttp.TCPConnector(limit=clients + 10)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(
            watch(session), *(flood(session, i) for i in range(clients))
        )
    rss_after = _rss_kib(server.proc.pid)

    assert statuses[503] > 0 and statuses[201] > 0, statuses
    assert not bad_503, bad_503[:3]
    assert max(pending_seen) <= max_pending, max(pending_seen)
    # Tens of thousands of refused submissions cost no memory to speak of.
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    view = await asyncio.to_thread(check_log, server.url, _vkey(server), ledger)
    # A submission refused for a full queue was never queued, so never logged.
    assert not refused & view.digests
    assert server.stop() == 0
    figures_line(
        f"overload[queue]: max_pending {max_pending}, {clients} clients for "
        f"{seconds:.1f} s: {sum(statuses.values())} submissions, "
        f"{statuses[201]} logged, {statuses[503]} answered 503 + Retry-After: 1; "
        f"most pending seen {max(pending_seen)}; server RSS "
        f"{rss_before // 1024} -> {rss_after // 1024} MiB; "
        f"none of the refused ones logged; "
        f"{view.leaves} leaves audited, 0 lost"
    )


def test_sigterm_answers_what_was_accepted_then_exits(tmp_path: Path) -> None:
    # A long linger keeps a batch in flight when the signal arrives.
    server = _server(tmp_path, "[sequencer]\nlinger_ms = 400\n")
    ledger = Ledger()
    burst = 40
    answers: list[int | None] = []
    ready = threading.Barrier(burst + 1)

    def one(n: int) -> None:
        client = Client(server.url, server.token)
        ready.wait()
        answers.append(ledger.submit(client, request_body("burst", n)))
        client.close()

    threads = [threading.Thread(target=one, args=(n,)) for n in range(burst)]
    with Load(server.url, server.token, ledger, "term", threads=4):
        time.sleep(0.5)
        for thread in threads:
            thread.start()
        ready.wait()
        time.sleep(0.15)  # the burst is queued, waiting for its batch
        stopping = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(30)
        stopped = time.monotonic() - stopping
        for thread in threads:
            thread.join()
    server._out.close()
    assert code == 0, server.log.read_text()[-2000:]
    # Everything accepted before the signal was answered, and answered 201.
    assert answers == [201] * burst, Counter(answers)
    assert stopped < 15
    assert "stopping: draining submissions in flight" in server.log.read_text()
    assert set(ledger.statuses) <= {"201", "503", "connection lost"}, ledger.statuses

    server = ServerProcess(tmp_path / "data", "--origin", ORIGIN)
    ledger.retry_in_doubt(server.url, server.token)
    view = check_log(server.url, _vkey(server), ledger)
    assert server.stop() == 0
    figures_line(
        f"overload[SIGTERM]: {burst} submissions queued behind a 400 ms batch "
        f"plus 4 clients under load; all {burst} answered 201, exit 0 after "
        f"{stopped:.2f} s; {ledger.sent} submitted, {len(ledger.acks)} in the log, "
        f"{ledger.retried} in doubt and sent again ({ledger.found} found logged), "
        f"0 lost; {view.leaves} leaves audited; answers {dict(ledger.statuses)}"
    )


def _closed(sock: socket.socket) -> tuple[bool, bytes]:
    """Whether the server closed `sock`, and what it sent before that."""
    received = b""
    sock.settimeout(0)
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return False, received
        except OSError:
            return True, received
        if not data:
            return True, received
        received += data


def test_idle_and_slow_clients_do_not_starve_others(tmp_path: Path) -> None:
    timeout = 2
    server = _server(
        tmp_path,
        f"idle_timeout_seconds = {timeout}\nbody_timeout_seconds = {timeout}\n",
    )
    address = ("127.0.0.1", server.port)
    token = server.token
    idle = [socket.create_connection(address) for _ in range(300)]
    slow_head = [socket.create_connection(address) for _ in range(100)]
    slow_body = [socket.create_connection(address) for _ in range(50)]
    for sock in slow_head:
        sock.sendall(b"POST /api/v1/entries HTTP/1.1\r\nHost: x\r\n")
    head = (
        "POST /api/v1/entries HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        "Content-Length: 400\r\n\r\n"
    ).encode()
    for sock in slow_body:
        sock.sendall(head + b'{"artifact": ')

    # Everyone else is served as usual meanwhile.
    ledger = Ledger()
    client = Client(server.url, token)
    latencies = []
    began = time.monotonic()
    n = 0
    while time.monotonic() - began < timeout + 1.5:
        for sock in slow_head + slow_body:
            with contextlib.suppress(OSError):
                sock.send(b" ")  # one byte every round, never a whole request
        started = time.monotonic()
        assert ledger.submit(client, request_body("polite", n)) == 201
        latencies.append(time.monotonic() - started)
        n += 1
        time.sleep(0.1)
    client.close()

    # By now the server has closed every one of them.
    idle_closed = sum(_closed(s)[0] for s in idle)
    head_closed = sum(_closed(s)[0] for s in slow_head)
    body_results = [_closed(s) for s in slow_body]
    body_closed = sum(closed for closed, _ in body_results)
    timed_out = sum(b"408 Request Timeout" in got for _, got in body_results)
    for sock in idle + slow_head + slow_body:
        sock.close()
    assert idle_closed == len(idle)
    assert head_closed == len(slow_head)
    assert body_closed == timed_out == len(slow_body), body_results[:2]
    assert max(latencies) < 1.0, max(latencies)
    assert server.proc.poll() is None
    check_log(server.url, _vkey(server), ledger)
    assert server.stop() == 0
    figures_line(
        f"overload[connections]: {len(idle)} idle, {len(slow_head)} slow-head and "
        f"{len(slow_body)} stalled-body connections held for {timeout + 1.5:.1f} s; "
        f"{n} submissions from another client meanwhile, slowest "
        f"{max(latencies) * 1000:.0f} ms; all {len(idle) + len(slow_head)} idle or "
        f"slow-head connections closed at the {timeout} s idle timeout, all "
        f"{len(slow_body)} stalled bodies answered 408 and closed"
    )
