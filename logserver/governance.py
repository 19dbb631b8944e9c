"""Governance: from an authenticated request to a decision, and only then a key.

`Governance` holds the policy in force (replaced whole on reload, so every
request is decided by one policy), the authenticators and the rate limiter,
and drives each request:

1. rate limit the identity (429);
2. evaluate the policy (`logserver.policy.evaluate`); a denial is recorded
   in the audit table and answered 403 with the reasons;
3. an automated rule without a quorum: record the decision and sign now;
4. a rule with a quorum or a ceremony: park the request (202) or add to the
   one already parked; the submission or approval that completes it signs.

The sequencer only ever sees a `Submission` built after step 3 or 4.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from logserver import ceremony, quorum
from logserver.audit import (
    ALLOWED,
    APPROVAL,
    DENIED,
    PENDING,
    REJECTION,
    AuditLog,
    Decision,
)
from logserver.auth import (
    BOOTSTRAP_SUBJECT,
    Authenticator,
    Identity,
    TokenAuthenticator,
    TokensFileError,
    load_tokens_file,
)
from logserver.errors import (
    Conflict,
    Forbidden,
    NotFound,
    TooManyRequests,
    Unavailable,
    Unprocessable,
)
from logserver.keys import LogKeys
from logserver.leaves import (
    LeafContext,
    PolicyDecision,
    build_leaf,
    dedup_key,
    request_claims,
)
from logserver.metrics import Metrics
from logserver.models import SubmitRequest
from logserver.pending import ApproverRecord as ApproverSnapshot
from logserver.pending import (
    CeremonyState,
    IdentityRecord,
    PendingRequest,
    QuorumState,
    new_request_id,
)
from logserver.policy import (
    Evaluation,
    Evaluator,
    Policy,
    PolicyError,
    Reason,
    Rule,
    builtin_policy,
    evaluate,
    load_policy,
)
from logserver.ratelimit import RateLimiter
from logserver.sequencer import Integrated, Sequencer, Submission
from logserver.storage import AuditRow, RequestRow, Storage
from signer.keys import ArtifactSigner
from verifier.approvals import Decision as Vote
from verifier.errors import VerificationError

logger = logging.getLogger(__name__)

APPROVER_ISSUER = "logserver/approver"


@dataclass(frozen=True, slots=True)
class Signed:
    """The request was signed (or had been): here is where it landed."""

    result: Integrated
    request: PendingRequest | None = None


@dataclass(frozen=True, slots=True)
class Parked:
    """The request waits for more builders or for approvals."""

    request: PendingRequest


def _request_json(claims: dict[str, Any], key: str) -> dict[str, Any]:
    """The request as the audit table records it: its claims and the key used."""
    return {**claims, "key": key}


def _refused(evaluation: Evaluation, reason: Reason) -> Evaluation:
    """An allowing evaluation turned into a denial for `reason`."""
    return Evaluation(
        False,
        evaluation.rule,
        (reason,),
        evaluation.skipped,
        evaluation.policy_sha256,
    )


def _denial(evaluation: Evaluation) -> Forbidden:
    where = f" by rule {evaluation.rule_name!r}" if evaluation.rule else ""
    return Forbidden(
        f"the policy denies this request{where}: "
        + "; ".join(r.message for r in evaluation.reasons),
        details=[r.as_json() for r in evaluation.reasons],
    )


class Governance:
    def __init__(
        self,
        *,
        storage: Storage,
        keys: LogKeys,
        sequencer: Sequencer,
        metrics: Metrics,
        audit: AuditLog,
        authenticator: Authenticator,
        bootstrap_token: str,
        policy_path: Path | None,
        tokens_path: Path | None,
    ) -> None:
        self.storage = storage
        self.keys = keys
        self.sequencer = sequencer
        self.metrics = metrics
        self.audit = audit
        self.auth = authenticator
        self.policy_path = policy_path
        self.tokens_path = tokens_path
        self._bootstrap_token = bootstrap_token
        self.policy: Policy = builtin_policy()
        self.limiter: RateLimiter | None = None
        self._reload_lock = asyncio.Lock()

    @property
    def origin(self) -> str:
        return self.sequencer.origin

    # Loading and reloading.

    def _load(self) -> tuple[Policy, TokenAuthenticator]:
        """Read the policy and tokens files; raise if either is unusable."""
        policy = builtin_policy()
        if self.policy_path is not None:
            policy = load_policy(self.policy_path)
        tokens = TokenAuthenticator()
        tokens.add_token(self._bootstrap_token, BOOTSTRAP_SUBJECT)
        if self.tokens_path is not None:
            tokens.add_hashes(load_tokens_file(self.tokens_path))
        return policy, tokens

    def _install(self, policy: Policy, tokens: TokenAuthenticator) -> None:
        unknown = sorted(
            {
                p.text
                for rule in policy.rules
                for p in rule.keys
                if "*" not in p.text and p.text not in self.keys.artifact
            }
        )
        for warning in policy.warnings:
            logger.warning("policy: %s", warning, extra={"policy": policy.source})
        if unknown:
            logger.warning(
                "policy names artifact keys this log does not have",
                extra={"keys": ",".join(unknown), "policy": policy.source},
            )
        old = self.policy.rate_limit
        if policy.rate_limit is None:
            self.limiter = None
        elif old != policy.rate_limit or self.limiter is None:
            self.limiter = RateLimiter(
                policy.rate_limit.per_second, policy.rate_limit.burst
            )
        # Two reference swaps: a request in flight keeps the policy it read.
        self.policy = policy
        self.auth.tokens = tokens
        logger.info(
            "policy in force",
            extra={
                "policy": policy.source,
                "sha256": policy.sha256,
                "rules": len(policy.rules),
            },
        )

    def load(self) -> None:
        """Load at start; a broken file stops the server from starting."""
        self._install(*self._load())

    async def reload(self) -> bool:
        """Reload on SIGHUP; a broken file is refused and the old policy stays."""
        async with self._reload_lock:
            try:
                loaded = await asyncio.to_thread(self._load)
            except (PolicyError, TokensFileError) as exc:
                self.metrics.policy_reloads.labels("failed").inc()
                logger.error(
                    "policy reload refused; the previous policy stays in force",
                    extra={"error": str(exc), "sha256": self.policy.sha256},
                )
                return False
            self._install(*loaded)
            self.metrics.policy_reloads.labels("ok").inc()
            return True

    # The write path.

    def check_rate(self, identity: Identity) -> None:
        limiter = self.limiter
        if limiter is not None:
            try:
                limiter.check((identity.issuer, identity.subject))
            except TooManyRequests:
                self.metrics.rate_limited.inc()
                raise

    def _signer(self, body: SubmitRequest) -> tuple[str, ArtifactSigner]:
        name = body.key or self.keys.default_artifact
        signer = self.keys.artifact.get(name)
        if signer is None:
            known = ", ".join(sorted(self.keys.artifact))
            raise Unprocessable(f"no artifact key named {name!r}; known: {known}")
        return name, signer

    def _audit_row(
        self, decision: Decision, identity: orjson.Fragment | None = None
    ) -> AuditRow:
        """An allowed decision's row, stored by the sequencer with its entry."""
        self.metrics.decisions.labels(decision.decision).inc()
        return decision.row(int(time.time()), identity)

    async def _record(self, decision: Decision) -> None:
        await self._record_many([decision])

    async def _record_many(self, decisions: Sequence[Decision]) -> None:
        for decision in decisions:
            self.metrics.decisions.labels(decision.decision).inc()
        await self.audit.record_many(decisions)

    async def _deny(
        self,
        identity: Identity,
        request: dict[str, Any],
        evaluation: Evaluation,
        request_id: str | None = None,
    ) -> Forbidden:
        await self._record(
            Decision(
                DENIED,
                identity,
                request,
                evaluation.rule_name,
                evaluation.policy_sha256,
                evaluation.reasons,
                request_id,
            )
        )
        logger.info(
            "request denied",
            extra={
                "issuer": identity.issuer,
                "subject": identity.subject,
                "rule": evaluation.rule_name,
                "reasons": ",".join(r.code for r in evaluation.reasons),
            },
        )
        return _denial(evaluation)

    @staticmethod
    def _automated(
        body: SubmitRequest,
        key: str,
        signer: ArtifactSigner,
        context: LeafContext,
        claims: dict[str, Any],
    ) -> Submission:
        """A submission for an automated rule: signed as soon as it is sequenced."""
        return Submission(
            dedup_key=context.dedup_key(claims),
            digest=bytes.fromhex(body.artifact.sha256),
            sign=signer.sign_digests,
            signer_name=key,
            build_leaf=lambda _, signature: context.leaf(claims, signature),
        )

    async def submit(self, identity: Identity, body: SubmitRequest) -> Signed | Parked:
        """Decide one request and act on the decision (steps 2 to 4)."""
        key, signer = self._signer(body)
        evaluation = evaluate(self.policy, identity, body, key)
        claims = request_claims(body)
        request = _request_json(claims, key)
        if not evaluation.allowed:
            raise await self._deny(identity, request, evaluation)
        rule = evaluation.rule
        assert rule is not None
        if rule.quorum is None and rule.ceremony is None:
            decision = PolicyDecision(rule.name, evaluation.policy_sha256)
            context = LeafContext.of(identity, decision, signer)
            submission = self._automated(body, key, signer, context, claims)
            allowed = Decision(
                ALLOWED, identity, request, rule.name, evaluation.policy_sha256
            )
            submission.audit = self._audit_row(allowed, context.identity)
            return Signed(await self.sequencer.submit(submission))
        return await self._park(identity, body, evaluation, rule, signer, key)

    async def submit_batch(
        self, identity: Identity, bodies: Sequence[SubmitRequest]
    ) -> list[Integrated]:
        """All or nothing: every element must be allowed for automated signing."""
        evaluator = Evaluator(self.policy, identity)
        planned: list[tuple[dict[str, Any], Evaluation, Submission | None]] = []
        problems: list[dict[str, Any]] = []
        # Entries of one request mostly share a rule and a key: what their
        # leaves have in common is encoded once per pair.
        contexts: dict[tuple[str, str], LeafContext] = {}
        for index, body in enumerate(bodies):
            key, signer = self._signer(body)
            evaluation = evaluator.evaluate(body, key)
            claims = request_claims(body)
            rule = evaluation.rule
            submission = None
            if evaluation.allowed and rule is not None:
                if rule.quorum is not None or rule.ceremony is not None:
                    evaluation = _refused(
                        evaluation,
                        Reason(
                            "batch_not_supported",
                            f"rule {rule.name!r} needs a quorum or approvals; "
                            "send this artifact alone to POST /api/v1/entries",
                        ),
                    )
                else:
                    context = contexts.get((rule.name, key))
                    if context is None:
                        decision = PolicyDecision(rule.name, evaluation.policy_sha256)
                        context = LeafContext.of(identity, decision, signer)
                        contexts[rule.name, key] = context
                    submission = self._automated(body, key, signer, context, claims)
            planned.append((_request_json(claims, key), evaluation, submission))
            if evaluation.reasons:
                problems += [
                    {"entry": index, **r.as_json()} for r in evaluation.reasons
                ]

        if problems:
            denials = []
            for request, evaluation, _ in planned:
                if evaluation.allowed:
                    evaluation = _refused(
                        evaluation,
                        Reason("batch_denied", "another entry of the batch is denied"),
                    )
                denials.append(self._deny(identity, request, evaluation))
            # One audit group for the whole batch, not one per element.
            await asyncio.gather(*denials)
            raise Forbidden(
                f"the policy denies {sum(1 for *_, s in planned if s is None)} of "
                f"{len(planned)} entries; nothing was signed",
                details=problems,
            )

        now = int(time.time())
        encoded = next(iter(contexts.values())).identity
        submissions = []
        for request, evaluation, submission in planned:
            assert submission is not None  # every element was allowed
            allowed = Decision(
                ALLOWED,
                identity,
                request,
                evaluation.rule_name,
                evaluation.policy_sha256,
            )
            submission.audit = allowed.row(now, encoded)
            submissions.append(submission)
        self.metrics.decisions.labels(ALLOWED).inc(len(submissions))
        return await self.sequencer.submit_many(submissions)

    # Parked requests.

    def _fresh(
        self,
        identity: Identity,
        body: SubmitRequest,
        evaluation: Evaluation,
        rule: Rule,
        signer: ArtifactSigner,
        key: str,
        lookup: str,
        now: int,
    ) -> PendingRequest:
        quorum_state = None
        ceremony_state = None
        if rule.quorum is not None:
            expires = now + rule.quorum.window_seconds
            quorum_state = QuorumState(
                builders=rule.quorum.builders,
                window_seconds=rule.quorum.window_seconds,
            )
        if rule.ceremony is not None:
            ceremony_state = CeremonyState(
                threshold=rule.ceremony.threshold,
                expires_seconds=rule.ceremony.expires_seconds,
                approvers=[
                    ApproverSnapshot(name=a.name, key_id=a.key_id, public_key_pem=a.pem)
                    for a in rule.ceremony.approvers
                ],
            )
            if rule.quorum is None:
                expires = now + rule.ceremony.expires_seconds
        return PendingRequest(
            id=new_request_id(),
            lookup=lookup,
            state="collecting" if rule.quorum is not None else "pending",
            rule=rule.name,
            mode="ceremonial" if rule.mode == "ceremonial" else "automated",
            policy_sha256=evaluation.policy_sha256,
            created=now,
            expires=expires,
            body=body.model_dump(exclude_none=True),
            key_name=key,
            key_id=signer.key_id,
            identity=IdentityRecord.of(identity),
            quorum=quorum_state,
            ceremony=ceremony_state,
        )

    async def _park(
        self,
        identity: Identity,
        body: SubmitRequest,
        evaluation: Evaluation,
        rule: Rule,
        signer: ArtifactSigner,
        key: str,
    ) -> Signed | Parked:
        now = int(time.time())
        request_json = _request_json(request_claims(body), key)
        if rule.quorum is not None:
            assert body.source is not None and body.source.commit is not None
            lookup = quorum.quorum_lookup(
                rule.name, body.artifact.name, body.source.commit
            )
        else:
            lookup = "request:" + dedup_key(body, identity, signer).hex()
        fresh = self._fresh(identity, body, evaluation, rule, signer, key, lookup, now)

        outcome: list[quorum.Report] = []

        def update(row: RequestRow | None) -> list[RequestRow]:
            found = None if row is None else PendingRequest.from_row(row)
            if rule.quorum is not None:
                writes, report = quorum.add_report(found, fresh, identity, now)
            else:
                writes, opened, created = ceremony.open_request(found, fresh, now)
                report = quorum.Report(opened, created=created)
            outcome.append(report)
            return [w.row() for w in writes]

        await self.storage.update_request(update, lookup=lookup)
        (report,) = outcome
        request = report.request
        problem = report.conflict or report.refused
        if report.conflict is not None:
            self.metrics.quorum_conflicts.labels(rule.name).inc()
            logger.warning(
                "builders disagree on a digest",
                extra={
                    "rule": rule.name,
                    "request_id": request.id,
                    "artifact": body.artifact.name,
                    "issuer": identity.issuer,
                    "subject": identity.subject,
                },
            )
        if problem is None and request.state == "denied":
            reasons = tuple(Reason(r.code, r.message) for r in request.reasons)
            problem = reasons[-1] if reasons else Reason("denied", "denied")
        if problem is not None:
            denied = Evaluation(False, rule, (problem,), (), evaluation.policy_sha256)
            raise await self._deny(identity, request_json, denied, request.id)

        if request.state in ("collecting", "pending"):
            await self._record(
                Decision(
                    PENDING,
                    identity,
                    request_json,
                    rule.name,
                    evaluation.policy_sha256,
                    request_id=request.id,
                )
            )
            logger.info(
                "request parked",
                extra={
                    "request_id": request.id,
                    "rule": rule.name,
                    "state": request.state,
                    "new": report.created,
                },
            )
            return Parked(request)
        await self._record(
            Decision(
                ALLOWED,
                identity,
                request_json,
                rule.name,
                evaluation.policy_sha256,
                request_id=request.id,
            )
        )
        return await self._finish(request)

    async def _finish(self, request: PendingRequest) -> Signed:
        """Sign an approved request, or find the entry of a logged one."""
        if request.state == "logged":
            assert request.entry_index is not None
            return Signed(self.existing(request.entry_index), request)
        result = await self.sign_parked(request)
        return Signed(
            result,
            request.model_copy(update={"state": "logged", "entry_index": result.index}),
        )

    def existing(self, index: int) -> Integrated:
        published = self.sequencer.published
        if published is None or index >= published.size:
            raise Unavailable(
                "the entry is not yet in this server's view of the log; retry shortly"
            )
        return Integrated(index, None, published, False)

    async def sign_parked(self, request: PendingRequest) -> Integrated:
        """Sign and log an approved request, then record its entry index."""
        signer = self.keys.artifact.get(request.key_name)
        if signer is None or signer.key_id != request.key_id:
            raise Conflict(
                f"artifact key {request.key_name!r} ({request.key_id[:16]}...) that "
                "this request was approved for is no longer available; submit again"
            )
        approvals: tuple[tuple[str, str], ...] = ()
        if request.ceremony is not None:
            approvals = tuple(
                sorted((a.key_id, a.signature) for a in request.ceremony.approvals)
            )
        builders = None
        if request.quorum is not None:
            builders = tuple(
                (r.issuer, r.subject)
                for r in request.quorum.reports
                if r.sha256 == request.sha256
            )
        decision = PolicyDecision(
            request.rule,
            request.policy_sha256,
            request.mode,
            approvals,
            request.id,
            builders,
        )
        body = request.submit_request()
        identity = request.identity.identity()
        submission = Submission(
            dedup_key=request.dedup_key(),
            digest=bytes.fromhex(request.sha256),
            sign=signer.sign_digests,
            signer_name=request.key_name,
            build_leaf=lambda _, signature: build_leaf(
                body, identity, decision, signer, signature
            ),
        )
        result = await self.sequencer.submit(submission)
        await self._mark_logged(request.id, result.index)
        logger.info(
            "parked request logged",
            extra={"request_id": request.id, "index": result.index},
        )
        return result

    async def _mark_logged(self, request_id: str, index: int) -> None:
        def update(row: RequestRow | None) -> list[RequestRow]:
            if row is None:
                return []
            found = PendingRequest.from_row(row)
            if found.state == "logged":
                return []
            return [
                found.model_copy(update={"state": "logged", "entry_index": index}).row()
            ]

        await self.storage.update_request(update, request_id=request_id)

    async def get(self, request_id: str) -> PendingRequest:
        row = await self.storage.get_request(request_id)
        if row is None:
            raise NotFound(f"no request {request_id!r}")
        request = PendingRequest.from_row(row).current(int(time.time()))
        if request.state == "approved":
            # Signed but not yet recorded (a crash, or another server): look.
            found = await self.storage.find_dedup(
                [(bytes.fromhex(request.sha256), request.dedup_key())]
            )
            index = found.get(request.dedup_key())
            if index is not None:
                await self._mark_logged(request.id, index)
                request = request.model_copy(
                    update={"state": "logged", "entry_index": index}
                )
        return request

    async def vote(
        self, request_id: str, key_id: str, signature: str, decision: Vote
    ) -> tuple[PendingRequest, Integrated | None]:
        """Record an approver's approval or rejection of a parked request."""
        request = await self.get(request_id)
        if request.ceremony is None:
            raise Conflict(f"request {request_id} needs no approvals")
        approver = request.ceremony.approver(key_id)
        who = Identity(
            APPROVER_ISSUER,
            approver.name if approver is not None else key_id,
            {"key_id": key_id},
        )
        request_json = {**request.body, "key": request.key_name}
        try:
            ceremony.check_signature(request, self.origin, key_id, signature, decision)
        except (LookupError, VerificationError) as exc:
            reason = (
                Reason(
                    "unknown_approver",
                    f"key {key_id} is not an approver of rule {request.rule!r}",
                )
                if isinstance(exc, LookupError)
                else Reason(
                    "bad_signature",
                    f"the {decision} signature does not verify with key {key_id} "
                    "over this request's approval message",
                )
            )
            evaluation = Evaluation(False, None, (reason,), (), request.policy_sha256)
            raise await self._deny(who, request_json, evaluation, request_id) from exc

        assert approver is not None
        now = int(time.time())
        votes: list[ceremony.Vote] = []

        def update(row: RequestRow | None) -> list[RequestRow]:
            assert row is not None  # requests are never deleted
            found = PendingRequest.from_row(row)
            if decision == "approve":
                writes, vote = ceremony.approve(found, key_id, signature, now)
            else:
                writes, vote = ceremony.reject(found, approver.name, now)
            votes.append(vote)
            return [w.row() for w in writes]

        await self.storage.update_request(update, request_id=request_id)
        (vote,) = votes
        request = vote.request
        if vote.counted:
            await self._record(
                Decision(
                    APPROVAL if decision == "approve" else REJECTION,
                    who,
                    request_json,
                    request.rule,
                    request.policy_sha256,
                    request_id=request_id,
                )
            )
            logger.info(
                "approver voted",
                extra={
                    "request_id": request_id,
                    "approver": approver.name,
                    "decision": decision,
                    "state": request.state,
                },
            )
        elif (
            decision == "reject"
            or request.state not in ("pending", "approved", "logged")
            or request.ceremony is None
            or not request.ceremony.approved_by(key_id)
        ):
            raise Conflict(
                f"request {request_id} is {request.state}; it takes no votes"
            )
        if vote.counted and request.state == "approved":
            # The approval that reached the threshold: the request is allowed.
            await self._record(
                Decision(
                    ALLOWED,
                    request.identity.identity(),
                    request_json,
                    request.rule,
                    request.policy_sha256,
                    request_id=request_id,
                )
            )
        if decision == "approve" and request.state in ("approved", "logged"):
            signed = await self._finish(request)
            return signed.request or request, signed.result
        return request, None
