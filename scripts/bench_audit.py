#!/usr/bin/env python3
"""Time `verifier audit` on a local tiles directory of 1,000,000 entries.

    scripts/bench_audit.py [--entries N] [--dir DIR] [--runs K] [--jobs N]

Builds the log once (entry bundles, every tile level and a checkpoint signed
with a throwaway Ed25519 key, all written with the verifier's own code),
then runs the `verifier audit` command K times on it and prints the wall
time of each run, with interpreter start-up included. The leaves are in our
leaf format, about 800 bytes like a real leaf with source and build claims,
so the audit parses every one of them. A DIR that already holds a log of N
entries is reused; without --dir a temporary directory is removed at the end.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from verifier.audit import subtree_root
from verifier.checkpoint import Checkpoint
from verifier.leaf import parse_leaf
from verifier.merkle import EMPTY_ROOT, leaf_hash, root_from_leaf_hashes
from verifier.note import NoteSignature, ed25519_key_id, format_note, verifier_key
from verifier.tiles import (
    TILE_HEIGHT,
    TILE_WIDTH,
    encode_entry_bundle,
    entries_path,
    tile_path,
)

ORIGIN = "bench.example/audit"
KEY_ID = "847180ad3110f7578270772c846328d8f0554025c00438056cb73111320a5412"
POLICY = "dc6b0f1d8a16242786bfd455df74828ead7fbb907cca1284dc5b7eaf9c354206"
LEAF = (
    '{{"artifact":{{"name":"dist/app-{i}.tar.gz","sha256":"{digest}","size":{size}}},'
    '"build":{{"builder":"ci.example/runner-{runner}",'
    '"invocation":"https://ci.example/acme/app/jobs/{i}"}},'
    '"identity":{{"claims":{{}},"issuer":"logserver/token","subject":"bootstrap"}},'
    '"policy":{{"approvals":[],"mode":"automated","policy_sha256":"' + POLICY + '",'
    '"rule":"builtin-bootstrap-token"}},'
    '"signature":{{"algorithm":"ecdsa-p256-sha256","key_id":"' + KEY_ID + '",'
    '"value":"{signature}"}},'
    '"source":{{"commit":"{commit}","ref":"refs/heads/main",'
    '"repository":"https://git.example/acme/app"}},'
    '"timestamp":{timestamp},"version":1}}'
)


def make_leaf(i: int) -> bytes:
    digest = hashlib.sha256(i.to_bytes(8, "big")).hexdigest()
    return LEAF.format(
        i=i,
        digest=digest,
        size=1000 + i,
        runner=i % 16,
        signature=base64.b64encode(os.urandom(71)).decode(),
        commit=digest[:40],
        timestamp=1_796_000_000 + i,
    ).encode()


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def build_log(root: Path, entries: int) -> str:
    """Write a log of `entries` leaves under root; return its verifier key."""
    assert parse_leaf(make_leaf(0)) is not None
    level: list[bytes] = []
    for first in range(0, entries, TILE_WIDTH):
        leaves = [make_leaf(i) for i in range(first, min(entries, first + TILE_WIDTH))]
        width, index = len(leaves), first // TILE_WIDTH
        write(root / entries_path(index, width), encode_entry_bundle(leaves))
        level.extend(leaf_hash(leaf) for leaf in leaves)
    height = 0
    while level:
        for at in range(0, len(level), TILE_WIDTH):
            chunk = level[at : at + TILE_WIDTH]
            path = tile_path(height // TILE_HEIGHT, at // TILE_WIDTH, len(chunk))
            write(root / path, b"".join(chunk))
        level = [
            subtree_root(b"".join(level[at : at + TILE_WIDTH]))
            for at in range(0, len(level) - TILE_WIDTH + 1, TILE_WIDTH)
        ]
        height += TILE_HEIGHT
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes_raw()
    text = Checkpoint(ORIGIN, entries, _root(root, entries)).to_text()
    signature = NoteSignature(
        ORIGIN, ed25519_key_id(ORIGIN, public), key.sign(text.encode())
    )
    write(root / "checkpoint", format_note(text, [signature]))
    vkey = verifier_key(ORIGIN, public)
    write(root / "log.vkey", vkey.encode() + b"\n")
    return vkey


def _root(root: Path, entries: int) -> bytes:
    """The root, recomputed from the leaf hashes in the level 0 tiles."""
    if entries == 0:
        return EMPTY_ROOT
    hashes = []
    for first in range(0, entries, TILE_WIDTH):
        width = min(TILE_WIDTH, entries - first)
        data = (root / tile_path(0, first // TILE_WIDTH, width)).read_bytes()
        hashes += [data[i : i + 32] for i in range(0, len(data), 32)]
    return root_from_leaf_hashes(hashes)


def existing_vkey(root: Path, entries: int) -> str | None:
    try:
        checkpoint = (root / "checkpoint").read_text().split("\n")
        vkey = (root / "log.vkey").read_text().strip()
    except OSError:
        return None
    return vkey if checkpoint[1] == str(entries) else None


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, help="build (or reuse) the log here")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, help="passed to verifier audit --jobs")
    args = parser.parse_args()

    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-audit-"))
    try:
        vkey = existing_vkey(root, args.entries)
        if vkey is None:
            began = time.perf_counter()
            vkey = build_log(root, args.entries)
            took = time.perf_counter() - began
            print(f"built {args.entries:,} entries in {root} in {took:.1f} s")
        command = ["verifier", "audit", "--log", str(root), "--log-key", vkey]
        if args.jobs:
            command += ["--jobs", str(args.jobs)]
        print("$", " ".join(command), f"   ({os.cpu_count()} CPUs)")
        times = []
        for run in range(args.runs):
            load = os.getloadavg()[0]
            cpu_before = _children_cpu()
            began = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True)
            times.append(time.perf_counter() - began)
            cpu = _children_cpu() - cpu_before
            if result.returncode != 0:
                print(result.stdout, result.stderr, file=sys.stderr)
                return 1
            print(
                f"run {run + 1}: {times[-1]:.2f} s wall, {cpu:.2f} s CPU "
                f"(load average before: {load:.2f})"
            )
        print(result.stdout)
        print(
            f"audit of {args.entries:,} entries: best {min(times):.2f} s, "
            f"median {statistics.median(times):.2f} s (wall, with start-up)"
        )
    finally:
        if args.dir is None:
            shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
