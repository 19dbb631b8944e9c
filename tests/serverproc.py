"""Run `logserver serve` as a real subprocess on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """A log server subprocess; `url` ends with a slash.

    With `tls`, a client context that trusts the server's certificate, the
    server is expected to serve HTTPS (give it --tls-cert and --tls-key).
    With `wait=False` the constructor returns as soon as the process runs,
    before the server is ready.
    """

    def __init__(
        self,
        data: Path,
        *args: str,
        env: dict[str, str] | None = None,
        tls: ssl.SSLContext | None = None,
        wait: bool = True,
    ) -> None:
        self.data = data
        self.port = free_port()
        self.tls = tls
        scheme = "http" if tls is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}/"
        self.log = data.parent / f"server-{self.port}.log"
        command = [
            sys.executable, "-m", "logserver.cli", "serve",
            "--data", str(data), "--listen", f"127.0.0.1:{self.port}", *args,
        ]  # fmt: skip
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            command,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        if wait:
            self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(
                    self.url + "healthz", timeout=1, context=self.tls
                ):
                    return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log.read_text()}")

    @property
    def token(self) -> str:
        return (self.data / "secrets" / "submit.token").read_text().strip()

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(
            self.url + path, timeout=10, context=self.tls
        ) as response:
            body: bytes = response.read()
            return body

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {self.token}",
            },
        )
        try:
            with urllib.request.urlopen(
                request, timeout=30, context=self.tls
            ) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self, timeout: float = 15) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._out.close()
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._out.close()


def spawned_children(pid: int) -> list[int]:
    """The live children of `pid` started by multiprocessing's "spawn" (the
    server's signing workers), not its resource tracker and not zombies."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            children.append(int(entry.name))
    return children
