"""Crash safety: SIGKILL the server under load, again and again.

Each cycle starts `logserver serve` on the same data (SQLite file or
PostgreSQL schema), runs concurrent clients (single and batch submissions),
and kills the server with SIGKILL at a random moment: while it starts, during a
batch, between the commit and the answer. After each restart, the requests
whose outcome was unknown are sent again, and `faults.check_log` proves that
no acknowledged entry was lost or moved, that every checkpoint handed out is
consistent with the new one, that no request was logged twice, and that a
full audit passes.

LOGSIGN_CRASH_CYCLES (default 6) sets the kills per backend and
LOGSIGN_CRASH_SEED the random seed; scripts/reliability runs long versions.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from tests.faults import Ledger, Load, check_log, env_int, figures_line
from tests.serverproc import ServerProcess

ORIGIN = "crash.example/log"


def test_sigkill_under_load_loses_nothing(database_url: str, tmp_path: Path) -> None:
    cycles = env_int("LOGSIGN_CRASH_CYCLES", 6)
    seed = env_int("LOGSIGN_CRASH_SEED", random.randrange(1, 1 << 30))
    rng = random.Random(seed)
    backend = database_url.split(":", 1)[0]
    where = f"(seed {seed}; rerun with LOGSIGN_CRASH_SEED={seed})"
    data = tmp_path / "data"
    args = ("--origin", ORIGIN, "--database", database_url)
    ledger = Ledger()
    began = time.monotonic()
    kills_in_start = 0
    audit_seconds = 0.0

    def after_restart(server: ServerProcess) -> int:
        """Send what was left in doubt again, then check the whole log."""
        nonlocal audit_seconds
        try:
            ledger.retry_in_doubt(server.url, server.token)
            vkey = (data / "public" / "log.vkey").read_text().strip()
            view = check_log(server.url, vkey, ledger)
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from exc
        audit_seconds += view.audit_seconds
        return view.leaves

    for cycle in range(cycles):
        if rng.random() < 0.2:
            # Sometimes kill it while it starts: opening the database,
            # loading the tree, publishing a checkpoint for what a crash left.
            starting = ServerProcess(data, *args, wait=False)
            time.sleep(rng.uniform(0.0, 1.2))
            starting.kill()
            kills_in_start += 1
            continue
        server = ServerProcess(data, *args)
        if cycle:
            after_restart(server)
        with Load(
            server.url, server.token, ledger, f"c{cycle}", seed=seed + cycle
        ) as load:
            time.sleep(rng.uniform(0.3, 1.5))
            server.kill()
            load.stop()
        assert not ledger.unexpected, (where, ledger.unexpected[:5])

    server = ServerProcess(data, *args)
    try:
        leaves = after_restart(server)
    finally:
        assert server.stop() == 0
    assert len(ledger.acks) == leaves, where  # every request landed exactly once
    figures_line(
        f"crash[{backend}]: {cycles} SIGKILLs ({kills_in_start} while starting), "
        f"{ledger.sent} submitted, {len(ledger.acks)} in the log, "
        f"{len(ledger.acks) - ledger.retried} acknowledged under load, "
        f"{ledger.retried} in doubt and sent again ({ledger.found} found logged), "
        f"0 lost, 0 duplicated; "
        f"answers {dict(ledger.statuses)}; audits {audit_seconds:.1f} s; "
        f"{time.monotonic() - began:.1f} s; seed {seed}"
    )
