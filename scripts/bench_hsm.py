"""How fast SoftHSM signs ECDSA P-256, raw and through `Pkcs11ArtifactSigner`.

    python scripts/bench_hsm.py [--seconds 3] [--batch 256] [--rounds N] [--uvloop]

Creates a throw-away SoftHSM2 token in a temporary directory, generates a
P-256 key in it, then prints:

1. the raw rate: one process, one session, CKM_ECDSA in a tight loop;
2. the rate through `Pkcs11ArtifactSigner.sign_digests` with 1 and 2 workers,
   for calls of `--batch` digests (several in flight) and for single-digest
   calls from many tasks, each with its ratio to the raw rate;
3. for each, the CPU time per signature summed over the processes involved
   (this process and the workers), and the part of it spent in the process
   that runs the event loop: unlike the rates, these hardly depend on what
   else the machine is running.

The signer's rates include what the raw loop leaves out: the conversion of
r || s to DER, the verification of every signature in the worker, and the
round trips between the event loop and the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from signer.keys import ECDSA_P256_SHA256
from signer.pkcs11_backend import Pkcs11ArtifactSigner, Pkcs11Config, generate_key

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
STORE = "bench"
KEY = "bench-p256"
PIN = "1234"  # a throw-away token's PIN
PIN_ENV = "BENCH_HSM_PIN"


@contextmanager
def temporary_token() -> Iterator[None]:
    """A fresh token in a temporary SoftHSM2 store, for this process and its
    children (SOFTHSM2_CONF is set before the module is first loaded)."""
    if shutil.which("softhsm2-util") is None or not Path(MODULE).exists():
        sys.exit("bench_hsm: SoftHSM2 is not installed (softhsm2-util, " + MODULE + ")")
    with tempfile.TemporaryDirectory(prefix="bench-hsm-") as tmp:
        tokens = Path(tmp, "tokens")
        tokens.mkdir()
        conf = Path(tmp, "softhsm2.conf")
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
            "log.level = ERROR\n"
        )
        os.environ["SOFTHSM2_CONF"] = str(conf)
        os.environ[PIN_ENV] = PIN
        subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                STORE,
                "--so-pin",
                "5678",
                "--pin",
                PIN,
            ],
            check=True,
            capture_output=True,
        )
        yield


def digests(count: int) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(count)]


@dataclass(frozen=True)
class Rate:
    per_second: float  # signatures per second of wall-clock time
    cpu_us: float  # CPU time per signature, summed over every process involved
    loop_us: float  # of which in the process that runs the event loop


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """CPU seconds of this process, and of `pids` together (Linux /proc)."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return time.process_time(), ticks / os.sysconf("SC_CLK_TCK")


def raw_rate(seconds: float) -> Rate:
    """One session, one thread, CKM_ECDSA in a loop: no DER, no checks."""
    import pkcs11

    token = pkcs11.lib(MODULE).get_token(token_label=STORE)
    with token.open(user_pin=PIN) as session:
        key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=KEY)
        batch = digests(1000)
        done = 0
        cpu = time.process_time()
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            for digest in batch:
                key.sign(digest, mechanism=pkcs11.Mechanism.ECDSA)
            done += len(batch)
        cpu = time.process_time() - cpu
    return Rate(done / elapsed, cpu / done * 1e6, cpu / done * 1e6)


async def measure(
    signer: Pkcs11ArtifactSigner, calls: list[list[bytes]], seconds: float
) -> Rate:
    """Sign `calls` concurrently, again and again, for `seconds`."""
    pids = signer.worker_pids
    done = 0
    loop_before, workers_before = cpu_seconds(pids)
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        results = await asyncio.gather(*(signer.sign_digests(c) for c in calls))
        done += sum(len(r) for r in results)
    loop_after, workers_after = cpu_seconds(pids)
    loop = loop_after - loop_before
    cpu = loop + workers_after - workers_before
    return Rate(done / elapsed, cpu / done * 1e6, loop / done * 1e6)


async def signer_rates(workers: int, batch: int, seconds: float) -> tuple[Rate, Rate]:
    """Rates through the signer: calls of `batch` digests; calls of one."""
    config = Pkcs11Config(
        module=MODULE,
        token_label=STORE,
        key_label=KEY,
        pin_env=PIN_ENV,
        workers=workers,
        timeout=60,
    )
    async with await Pkcs11ArtifactSigner.open("bench", config) as signer:
        await signer.sign_digests(digests(workers * 64))  # warm up
        # Several batch calls in flight, as concurrent requests would be.
        batched = await measure(
            signer, [digests(batch) for _ in range(4 * workers)], seconds
        )
        # Many tasks with one digest each: the signer batches them itself.
        single = await measure(signer, [[d] for d in digests(2000)], seconds)
    return batched, single


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--batch", type=int, default=256, help="digests per call")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat everything; report medians"
    )
    parser.add_argument(
        "--uvloop", action="store_true", help="run the signer on uvloop, as the server"
    )
    args = parser.parse_args()
    run = asyncio.run
    if args.uvloop:
        import uvloop

        run = uvloop.run
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    loop = "uvloop" if args.uvloop else "asyncio"
    print(f"cores: {os.cpu_count()}, load average before: {load}, loop: {loop}")
    rows: dict[str, list[Rate]] = {}
    with temporary_token():
        config = Pkcs11Config(
            module=MODULE, token_label=STORE, key_label=KEY, pin_env=PIN_ENV
        )
        generate_key(config, ECDSA_P256_SHA256)
        for _ in range(args.rounds):
            rows.setdefault("raw SoftHSM, 1 session, tight loop", []).append(
                raw_rate(args.seconds)
            )
            for workers in (1, 2):
                batched, single = run(signer_rates(workers, args.batch, args.seconds))
                name = f"sign_digests, {workers} worker(s)"
                rows.setdefault(f"{name}, {args.batch}-digest calls", []).append(
                    batched
                )
                rows.setdefault(f"{name}, 1-digest calls", []).append(single)
    title = "ECDSA P-256 (median of rounds)"
    print(f"{title:52} {'sig/s':>8} {'x raw':>6} {'CPU us/sig':>10} {'loop':>5}")
    raw = None
    for name, rates in rows.items():
        per_second = statistics.median(r.per_second for r in rates)
        cpu_us = statistics.median(r.cpu_us for r in rates)
        loop_us = statistics.median(r.loop_us for r in rates)
        raw = raw or per_second
        print(
            f"{name:52} {per_second:8,.0f} {per_second / raw:6.2f} "
            f"{cpu_us:10.0f} {loop_us:5.0f}"
        )
    if args.rounds > 1:
        print("each round, sig/s:")
        for name, rates in rows.items():
            print(f"  {name}: " + " ".join(f"{r.per_second:,.0f}" for r in rates))
    return 0


if __name__ == "__main__":  # spawned workers re-import this module: keep the guard
    sys.exit(main())
