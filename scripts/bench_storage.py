"""How the SQLite append cost grows with the log.

    python scripts/bench_storage.py [--entries 400000] [--batch 800]
                                    [--step 100000] [--without-index NAME]

Appends batches to a fresh SQLite database in a temporary directory through
`SqliteStorage.append`, as the sequencer does (entries, their audit rows,
one transaction and one fsync per batch, no HTTP, no signing), and prints,
for every `--step` entries, the wall time and the CPU time (all threads) of
one append, and both per entry. Making the random rows is not timed.

Rows are random bytes of the sizes of a real entry with source and build
claims (`--leaf-bytes`, `--audit-bytes`). The artifact digests share a
12-byte prefix per run, as the load generator's do. With `--without-index`
the named index is dropped after the schema is made, to see what it costs;
the server needs every index, so this is for diagnosis only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from logserver.storage.base import AuditRow, EntryRow
from logserver.storage.sqlite import SqliteStorage


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time SQLite appends as the log grows.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--entries", type=int, default=400_000, help="log size to reach"
    )
    parser.add_argument("--batch", type=int, default=800, help="entries a transaction")
    parser.add_argument("--step", type=int, default=100_000, help="entries a line")
    parser.add_argument("--leaf-bytes", type=int, default=850)
    parser.add_argument("--audit-bytes", type=int, default=550)
    parser.add_argument(
        "--without-index",
        metavar="NAME",
        help="drop this index first (entries_artifact_dedup, "
        "entries_leaf_hash_prefix, audit_decision)",
    )
    parser.add_argument(
        "--wal-autocheckpoint",
        type=int,
        metavar="PAGES",
        help="set SQLite's wal_autocheckpoint on the writer (server: default)",
    )
    args = parser.parse_args()
    if min(args.entries, args.batch, args.step) < 1:
        parser.error("--entries, --batch and --step must be positive")
    return args


async def run(args: argparse.Namespace, directory: Path) -> None:
    storage = SqliteStorage(directory / "log.db")
    await storage.open()
    if args.without_index:
        name = args.without_index
        await storage._write(lambda conn: conn.execute(f'DROP INDEX "{name}"'))

    if args.wal_autocheckpoint is not None:
        pages = args.wal_autocheckpoint
        await storage._write(lambda c: c.execute(f"PRAGMA wal_autocheckpoint={pages}"))

    print(f"{'entries':>9} | {'ms/batch':>8} | {'CPU ms/batch':>12} | "
          f"{'us/entry':>8} | {'CPU us/entry':>12}")  # fmt: skip
    prefix = os.urandom(12)
    size = batches = 0
    wall = cpu = 0.0
    while size < args.entries:
        count = min(args.batch, args.entries - size)
        entries = [
            EntryRow(
                os.urandom(args.leaf_bytes),
                os.urandom(32),
                os.urandom(32),
                prefix + os.urandom(20),
            )
            for _ in range(count)
        ]
        audit = [
            AuditRow(0, "allowed", "issuer", "subject", "rule", None, record)
            for record in (os.urandom(args.audit_bytes) for _ in range(count))
        ]
        root = os.urandom(32)
        began, cpu_began = time.perf_counter(), time.process_time()
        await storage.append(size, entries, [], root, audit)
        wall += time.perf_counter() - began
        cpu += time.process_time() - cpu_began
        size += count
        batches += 1
        if size % args.step == 0 or size == args.entries:
            per_batch, per_entry = 1e3 / batches, 1e6 / (batches * args.batch)
            print(
                f"{size:>9,} | {wall * per_batch:>8.1f} | {cpu * per_batch:>12.1f} | "
                f"{wall * per_entry:>8.1f} | {cpu * per_entry:>12.1f}",
                flush=True,
            )
            batches = 0
            wall = cpu = 0.0
    await storage.close()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="logsign-storage-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
