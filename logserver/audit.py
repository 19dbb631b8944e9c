"""The audit table: every policy decision, allowed or denied.

A request is answered only after its decision is durable. Decisions made at
the same time are written together (group commit): one writer task takes
everything queued and stores it in one transaction, so auditing costs one
transaction per burst rather than one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from logserver.auth import Identity
from logserver.errors import Unavailable
from logserver.leaves import identity_json
from logserver.policy import Reason
from logserver.storage import AuditRow, Storage

logger = logging.getLogger(__name__)

# What the audit table records as `decision`.
ALLOWED = "allowed"  # signed now (or answered with the entry already logged)
DENIED = "denied"  # refused by the policy; nothing signed
PENDING = "pending"  # parked: waiting for a quorum or approvals
APPROVAL = "approval"  # an approver approved a parked request
REJECTION = "rejection"  # an approver rejected a parked request

_MAX_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision about one request, as the audit table records it."""

    decision: str
    identity: Identity
    request: dict[str, Any] | None
    rule: str | None
    policy_sha256: str | None
    reasons: Sequence[Reason] = ()
    request_id: str | None = None

    def row(self, now: int, identity: orjson.Fragment | None = None) -> AuditRow:
        """The row; `identity` is the caller already encoded, if at hand."""
        record = {
            "identity": identity_json(self.identity) if identity is None else identity,
            "request": self.request,
            "policy_sha256": self.policy_sha256,
            "reasons": [r.as_json() for r in self.reasons],
        }
        return AuditRow(
            time=now,
            decision=self.decision,
            issuer=self.identity.issuer,
            subject=self.identity.subject,
            rule=self.rule,
            request_id=self.request_id,
            record=orjson.dumps(record, option=orjson.OPT_SORT_KEYS),
        )


def audit_json(index: int, row: AuditRow) -> dict[str, Any]:
    """An audit row as the audit API serves it."""
    record = orjson.loads(row.record)
    return {
        "id": index,
        "time": row.time,
        "decision": row.decision,
        "identity": record["identity"],
        "rule": row.rule,
        "policy_sha256": record["policy_sha256"],
        "request_id": row.request_id,
        "request": record["request"],
        "reasons": record["reasons"],
    }


class AuditLog:
    """Writes decisions to storage in groups; `record` returns once stored."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._queue: asyncio.Queue[tuple[AuditRow, asyncio.Future[None]]] = (
            asyncio.Queue()
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._writer(), name="audit-writer")

    async def stop(self) -> None:
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(Unavailable("the log is stopping"))

    async def record(self, decision: Decision) -> None:
        """Store one decision durably; raise `Unavailable` if storage fails."""
        await self.record_many([decision])

    async def record_many(self, decisions: Sequence[Decision]) -> None:
        """Store decisions durably, in one group; one wait for all of them."""
        if self._task is None:
            raise Unavailable("the log is not accepting requests", retry_after=5)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        now = int(time.time())
        for decision in decisions:
            self._queue.put_nowait((decision.row(now), future))
        await asyncio.shield(future)

    async def _writer(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self.storage.append_audit([row for row, _ in batch])
            except Exception as exc:
                logger.warning(
                    "cannot store audit records",
                    extra={"records": len(batch), "error": str(exc)},
                )
                error = Unavailable(
                    "the audit table is unavailable; retry shortly", retry_after=2
                )
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
            finally:
                for _ in batch:
                    self._queue.task_done()
