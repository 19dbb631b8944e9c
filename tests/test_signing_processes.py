"""A software key signing large batches in worker processes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from signer.keys import ECDSA_P256_SHA256, RSA_PSS_SHA256
from signer.software import PROCESS_BATCH, SoftwareArtifactSigner, generate_artifact_key

ROOT = Path(__file__).resolve().parent.parent


def digests(count: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(count)]


def check(
    signer: SoftwareArtifactSigner, signed: list[bytes], items: list[bytes]
) -> None:
    assert len(signed) == len(items)
    public = signer.public_key
    prehashed = Prehashed(hashes.SHA256())
    for signature, digest in zip(signed, items, strict=True):
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, digest, ec.ECDSA(prehashed))
        else:
            assert isinstance(public, rsa.RSAPublicKey)
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            public.verify(signature, digest, pss, prehashed)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (the pool reaps it later).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.mark.parametrize("algorithm", [ECDSA_P256_SHA256, RSA_PSS_SHA256])
async def test_large_batches_are_signed_in_order_by_the_workers(algorithm: str) -> None:
    key = generate_artifact_key(algorithm)
    signer = SoftwareArtifactSigner("default", algorithm, key, processes=2)
    processes = signer.processes
    assert processes is not None
    try:
        small = digests(PROCESS_BATCH - 1)
        check(signer, await signer.sign_digests(small), small)
        assert processes.pids() == []  # small batches stay in the server

        large = digests(PROCESS_BATCH * 2 + 3)
        check(signer, await signer.sign_digests(large), large)
        pids = processes.pids()
        assert len(pids) == 2 and os.getpid() not in pids
    finally:
        await signer.aclose()
    assert wait_gone(pids) == []


async def test_a_wrong_signature_would_be_caught_by_the_check() -> None:
    # The check used above can fail: a signature over another digest.
    signer = SoftwareArtifactSigner(
        "default", ECDSA_P256_SHA256, generate_artifact_key(ECDSA_P256_SHA256)
    )
    items = digests(2)
    signed = await signer.sign_digests(items)
    with pytest.raises(InvalidSignature):
        check(signer, signed[::-1], items)


async def test_a_killed_worker_falls_back_to_threads_then_restarts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = generate_artifact_key(ECDSA_P256_SHA256)
    signer = SoftwareArtifactSigner("default", ECDSA_P256_SHA256, key, processes=2)
    processes = signer.processes
    assert processes is not None
    processes._retry_seconds = 0.5
    try:
        items = digests(PROCESS_BATCH)
        check(signer, await signer.sign_digests(items), items)
        first = processes.pids()
        os.kill(first[0], signal.SIGKILL)

        # The batch during the outage is signed anyway, in this process.
        with caplog.at_level(logging.WARNING, logger="signer.signing_processes"):
            for _ in range(3):
                items = digests(PROCESS_BATCH)
                check(signer, await signer.sign_digests(items), items)
        assert "a signing process died" in caplog.text
        assert signer.workers_lost == processes.workers_lost == 1
        assert processes.pids() == []
        assert wait_gone(first) == []

        await asyncio.sleep(0.6)
        items = digests(PROCESS_BATCH)
        check(signer, await signer.sign_digests(items), items)
        second = processes.pids()
        assert len(second) == 2 and not set(second) & set(first)
    finally:
        await signer.aclose()
    assert wait_gone(second) == []


async def test_nothing_is_signed_after_close() -> None:
    key = generate_artifact_key(ECDSA_P256_SHA256)
    signer = SoftwareArtifactSigner("default", ECDSA_P256_SHA256, key, processes=1)
    await signer.aclose()
    items = digests(PROCESS_BATCH)
    # The threads still sign; no process is started after close.
    check(signer, await signer.sign_digests(items), items)
    assert signer.processes is not None and signer.processes.pids() == []


def test_workers_exit_when_the_server_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import asyncio, os, sys
        from signer.keys import ECDSA_P256_SHA256
        from signer.software import SoftwareArtifactSigner, generate_artifact_key

        async def main():
            key = generate_artifact_key(ECDSA_P256_SHA256)
            signer = SoftwareArtifactSigner(
                "default", ECDSA_P256_SHA256, key, processes=2
            )
            await signer.sign_digests([os.urandom(32) for _ in range(256)])
            print(*signer.processes.pids(), flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
        """
    )
    # Its stderr goes to a file: once it is killed, multiprocessing's
    # resource tracker reports the semaphores it left, as expected here.
    errors = (tmp_path / "stderr").open("w")
    server = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert server.stdout is not None
        pids = [int(p) for p in server.stdout.readline().split()]
        assert len(pids) == 2, (tmp_path / "stderr").read_text()
        assert all(alive(p) for p in pids)
        server.kill()  # no shutdown: SIGKILL
        server.wait(10)
        assert wait_gone(pids) == []
    finally:
        server.kill()
        server.wait(10)
        errors.close()
