"""What an interrupted atomic write leaves behind is cleared, and only that."""

from __future__ import annotations

import os
import time
from pathlib import Path

from signer.atomicfile import remove_stale_temporaries, write_atomic
from tests.serverproc import ServerProcess


def age(path: Path, seconds: float) -> Path:
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_only_stale_temporaries_of_write_atomic_are_removed(tmp_path: Path) -> None:
    write_atomic(tmp_path / "log.vkey", b"key\n")
    stale = tmp_path / ".log.vkey.0123456789abcdef.tmp"
    stale.write_bytes(b"ke")
    age(stale, 3600)
    fresh = tmp_path / ".keys.json.fedcba9876543210.tmp"
    fresh.write_bytes(b"[")  # a write going on now
    others = [
        tmp_path / ".hidden",
        tmp_path / "notes.tmp",
        tmp_path / ".log.vkey.not-hex-at-all!.tmp",
        tmp_path / ".log.vkey.0123456789abcde.tmp",  # 15 hex digits
    ]
    for path in others:
        path.write_bytes(b"x")
        age(path, 3600)
    (tmp_path / ".dir.0123456789abcdef.tmp").mkdir()

    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists()
    assert fresh.exists() and all(p.exists() for p in others)
    assert (tmp_path / "log.vkey").read_bytes() == b"key\n"
    assert remove_stale_temporaries(tmp_path / "missing") == []


def test_the_server_clears_them_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "secrets").mkdir(parents=True, mode=0o700)
    (data / "public").mkdir()
    left = [
        data / "secrets" / ".checkpoint.pem.00112233445566ff.tmp",
        data / "public" / ".log.vkey.aabbccddeeff0011.tmp",
    ]
    for path in left:
        path.write_bytes(b"cut short")
        age(path, 600)
    server = ServerProcess(data)
    try:
        assert not any(p.exists() for p in left)
        assert (data / "public" / "log.vkey").is_file()
    finally:
        assert server.stop() == 0
    assert server.log.read_text().count("removed a file left by an interrupted") == 2
