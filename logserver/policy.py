"""The pre-sign policy: who may sign which artifacts, with which keys, how.

A policy is one TOML file (SPEC.md section 9). Its rules are tried in file
order, and the first rule that *applies* to a request decides it:

1. A rule applies when every claim in its `match` table matches the caller's
   identity, the artifact name matches one of its `artifacts` patterns, and
   the artifact key (the request's `key`, or the log's default key) matches
   one of its `keys` patterns. A rule that does not apply is skipped.
2. The applying rule's requirements are checked: required claims present, a
   protected ref, a source commit for a quorum. Any unmet requirement denies
   the request; later rules are not consulted, so a specific rule placed
   first cannot be bypassed by a broader rule below it.
3. If every requirement holds, the rule's mode says what happens: an
   automated rule signs now (after its quorum, if it has one), a ceremonial
   rule parks the request for approvals.
4. A request no rule applies to is denied.

Patterns are literal strings in which `*` matches any run of characters,
`/` included. A list of patterns matches if any of them does.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from logserver.auth import TOKEN_ISSUER, Identity
from logserver.models import SubmitRequest
from verifier.approvals import approver_key_supported
from verifier.leaf import public_key_id

# The claims a rule can match on. OIDC tokens are mapped onto these names
# (logserver/oidc.py); a bearer token has only `issuer` and `subject`.
IDENTITY_CLAIMS = (
    "issuer",
    "subject",
    "repository",
    "repository_id",
    "repository_owner",
    "repository_owner_id",
    "ref",
    "ref_type",
    "ref_protected",
    "sha",
    "workflow_ref",
    "workflow_sha",
    "job_workflow_ref",
    "job_workflow_sha",
    "runner_environment",
    "environment",
    "event_name",
    "actor",
)
# Request members a rule can require, named by their path in the request.
REQUEST_FIELDS = (
    "source.repository",
    "source.commit",
    "source.ref",
    "build.builder",
    "build.invocation",
    "artifact.size",
)
# Names that identify by name only; rules should pin the immutable ID too.
_MUTABLE_NAMES = {
    "repository": "repository_id",
    "repository_owner": "repository_owner_id",
}

# Until a policy file is configured, the bootstrap token may sign anything.
BUILTIN_RULE = "builtin-bootstrap-token"
BUILTIN_POLICY_TEXT = b"# built-in: any valid bootstrap token may sign any artifact\n"

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
PatternText = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
Patterns = PatternText | list[PatternText]


class PolicyError(Exception):
    """The policy file cannot be used; the message says where and why."""


# The file format, validated strictly: unknown keys are errors.


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RateLimitSection(_Section):
    requests_per_minute: float = Field(gt=0, le=6_000_000)
    burst: int = Field(default=10, ge=1, le=1_000_000)


class ApproverSection(_Section):
    public_key: str = Field(description="PEM SubjectPublicKeyInfo, Ed25519 or ECDSA")


class RequireSection(_Section):
    claims: list[str] = Field(default_factory=list)
    protected_ref: bool = False

    @field_validator("claims")
    @classmethod
    def _known(cls, claims: list[str]) -> list[str]:
        for claim in claims:
            if claim not in IDENTITY_CLAIMS and claim not in REQUEST_FIELDS:
                raise ValueError(
                    f"unknown claim {claim!r}; use an identity claim "
                    f"({', '.join(IDENTITY_CLAIMS)}) or a request field "
                    f"({', '.join(REQUEST_FIELDS)})"
                )
        return claims


class QuorumSection(_Section):
    builders: int = Field(ge=2, le=100)
    window_seconds: int = Field(default=3600, ge=1, le=30 * 86400)


class CeremonySection(_Section):
    approvers: list[Name] = Field(min_length=1)
    threshold: int = Field(ge=1)
    expires_seconds: int = Field(default=86400, ge=60, le=90 * 86400)


class RuleSection(_Section):
    name: Name
    description: str = ""
    mode: Literal["automated", "ceremonial"] = "automated"
    match: dict[str, Patterns] = Field(default_factory=dict)
    artifacts: Patterns
    keys: Patterns
    require: RequireSection = RequireSection()
    quorum: QuorumSection | None = None
    ceremony: CeremonySection | None = None

    @field_validator("match")
    @classmethod
    def _known_claims(cls, match: dict[str, Any]) -> dict[str, Any]:
        for claim in match:
            if claim not in IDENTITY_CLAIMS:
                raise ValueError(
                    f"cannot match on {claim!r}; identity claims are "
                    f"{', '.join(IDENTITY_CLAIMS)}"
                )
        return match


class PolicyFile(_Section):
    version: Literal[1]
    protected_refs: list[PatternText] = Field(default_factory=list)
    rate_limit: RateLimitSection | None = None
    approvers: dict[Name, ApproverSection] = Field(default_factory=dict)
    rules: list[RuleSection] = Field(min_length=1)


# The compiled policy.


@dataclass(frozen=True, slots=True)
class Pattern:
    """A policy pattern: `*` matches any run of characters, the rest is literal.

    Matched without regular expressions: a regex of k wildcards backtracks
    in O(n**k) on a value that almost matches, and the values (artifact
    names, token claims) come from callers, so a pattern like `*-*-*.tgz`
    against a 1,024-character name would hold the event loop for minutes.
    Here the literal pieces between the wildcards are found left to right,
    each as early as possible, which decides a match in O(n * pieces).
    """

    text: str
    parts: tuple[str, ...]

    @classmethod
    def compile(cls, text: str) -> Pattern:
        return cls(text, tuple(text.split("*")))

    def matches(self, value: str) -> bool:
        parts = self.parts
        if len(parts) == 1:
            return value == self.text
        first, last, middle = parts[0], parts[-1], parts[1:-1]
        end = len(value) - len(last)
        if end < len(first) or not value.startswith(first) or not value.endswith(last):
            return False
        at = len(first)
        for part in middle:
            found = value.find(part, at, end)
            if found < 0:
                return False
            at = found + len(part)
        return True


def _patterns(value: str | Sequence[str]) -> tuple[Pattern, ...]:
    texts = [value] if isinstance(value, str) else list(value)
    return tuple(Pattern.compile(text) for text in texts)


def _any(patterns: Sequence[Pattern], value: str) -> bool:
    # A loop, not any() over a generator: this runs for every batch entry.
    for pattern in patterns:  # noqa: SIM110
        if pattern.matches(value):
            return True
    return False


def _texts(patterns: Sequence[Pattern]) -> str:
    return ", ".join(repr(p.text) for p in patterns)


@dataclass(frozen=True, slots=True)
class Approver:
    name: str
    key_id: str
    public_key: PublicKeyTypes
    pem: str


@dataclass(frozen=True, slots=True)
class Quorum:
    builders: int
    window_seconds: int


@dataclass(frozen=True, slots=True)
class Ceremony:
    approvers: tuple[Approver, ...]
    threshold: int
    expires_seconds: int


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    mode: str
    match: Mapping[str, tuple[Pattern, ...]]
    artifacts: tuple[Pattern, ...]
    keys: tuple[Pattern, ...]
    require_claims: tuple[str, ...] = ()
    protected_ref: bool = False
    quorum: Quorum | None = None
    ceremony: Ceremony | None = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class RateLimit:
    per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    sha256: str
    source: str
    protected_refs: tuple[Pattern, ...] = ()
    rate_limit: RateLimit | None = None
    approvers: Mapping[str, Approver] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reason:
    """One machine-readable reason for a denial."""

    code: str
    message: str

    def as_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The policy's answer to one request, with the reasons behind it."""

    allowed: bool
    rule: Rule | None
    reasons: tuple[Reason, ...]
    skipped: tuple[tuple[str, str], ...]
    policy_sha256: str

    @property
    def rule_name(self) -> str | None:
        return None if self.rule is None else self.rule.name

    def explain(self) -> list[str]:
        """Sentences for people: which rules were skipped and why, the verdict."""
        lines = [f"rule {name!r} does not apply: {why}" for name, why in self.skipped]
        rule = self.rule
        if self.allowed and rule is not None:
            verdict = f"allowed by rule {rule.name!r} ({rule.mode})"
            if rule.quorum is not None:
                verdict += (
                    f", once {rule.quorum.builders} distinct builders report the "
                    f"same digest within {rule.quorum.window_seconds} s"
                )
            if rule.ceremony is not None:
                verdict += (
                    f", after {rule.ceremony.threshold} of "
                    f"{len(rule.ceremony.approvers)} approvers approve"
                )
            lines.append(verdict)
        else:
            where = f" by rule {rule.name!r}" if rule is not None else ""
            because = "; ".join(r.message for r in self.reasons)
            lines.append(f"denied{where} because {because}")
        return lines


def _request_field(request: SubmitRequest, path: str) -> str | None:
    section, _, member = path.partition(".")
    holder: BaseModel | None = getattr(request, section)
    if holder is None:
        return None
    value = getattr(holder, member)
    return None if value is None else str(value)


def identity_facts(identity: Identity) -> dict[str, str]:
    """The identity as the policy sees it: its claims plus issuer and subject."""
    return {**identity.claims, "issuer": identity.issuer, "subject": identity.subject}


def _identity_mismatch(rule: Rule, facts: Mapping[str, str]) -> str | None:
    for claim, patterns in rule.match.items():
        value = facts.get(claim)
        if value is None:
            return f"the identity has no {claim!r} claim"
        if not _any(patterns, value):
            return f"{claim} {value!r} matches none of {_texts(patterns)}"
    return None


def _unmet(
    policy: Policy, rule: Rule, facts: Mapping[str, str], request: SubmitRequest
) -> list[Reason]:
    reasons = []
    for claim in rule.require_claims:
        if claim in REQUEST_FIELDS:
            present = _request_field(request, claim) is not None
            where = "the request"
        else:
            present = bool(facts.get(claim))
            where = "the identity"
        if not present:
            reasons.append(
                Reason(
                    "claim_missing", f"rule {rule.name!r} requires {claim!r} in {where}"
                )
            )
    if rule.protected_ref and not _ref_is_protected(policy, facts):
        ref = facts.get("ref")
        reasons.append(
            Reason(
                "ref_not_protected",
                f"rule {rule.name!r} requires a protected ref; "
                + (f"{ref!r} is not protected" if ref else "the identity has no ref"),
            )
        )
    if rule.quorum is not None and _request_field(request, "source.commit") is None:
        reasons.append(
            Reason(
                "claim_missing",
                f"rule {rule.name!r} has a reproducibility quorum, which needs "
                "'source.commit' in the request",
            )
        )
    return reasons


def _ref_is_protected(policy: Policy, facts: Mapping[str, str]) -> bool:
    # GitLab says so in a claim; for other issuers the policy lists them.
    if facts.get("ref_protected") == "true":
        return True
    ref = facts.get("ref")
    return ref is not None and _any(policy.protected_refs, ref)


class Evaluator:
    """Decides the requests of one caller under one policy.

    Whether a rule's `match` table fits the caller is worked out once, not
    once per request: a batch request of a thousand artifacts has one caller.
    """

    def __init__(self, policy: Policy, identity: Identity) -> None:
        self.policy = policy
        self.identity = identity
        self._facts = identity_facts(identity)
        self._mismatch = [_identity_mismatch(r, self._facts) for r in policy.rules]

    def evaluate(self, request: SubmitRequest, key: str) -> Evaluation:
        """Decide a request in the documented order (see the module docstring)."""
        policy = self.policy
        artifact = request.artifact.name
        skipped: list[tuple[str, str]] = []
        for rule, mismatch in zip(policy.rules, self._mismatch, strict=True):
            # 1.
            why = mismatch
            if why is None and not _any(rule.artifacts, artifact):
                why = f"artifact {artifact!r} matches none of {_texts(rule.artifacts)}"
            if why is None and not _any(rule.keys, key):
                why = f"key {key!r} matches none of {_texts(rule.keys)}"
            if why is not None:
                skipped.append((rule.name, why))
                continue
            # 2.
            reasons = _unmet(policy, rule, self._facts, request)
            # 3.
            return Evaluation(
                not reasons, rule, tuple(reasons), tuple(skipped), policy.sha256
            )
        # 4.
        identity = self.identity
        denial = Reason(
            "no_rule",
            f"no rule allows {identity.issuer} {identity.subject!r} to sign "
            f"{artifact!r} with key {key!r}",
        )
        return Evaluation(False, None, (denial,), tuple(skipped), policy.sha256)


def evaluate(
    policy: Policy, identity: Identity, request: SubmitRequest, key: str
) -> Evaluation:
    """Decide one request in the documented order (see the module docstring)."""
    return Evaluator(policy, identity).evaluate(request, key)


# Loading.


def _validation_message(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)


def _approver(name: str, section: ApproverSection) -> Approver:
    try:
        key = load_pem_public_key(section.public_key.encode())
    except ValueError as exc:
        raise PolicyError(
            f"approvers.{name}.public_key is not a PEM public key: {exc}"
        ) from exc
    if not approver_key_supported(key):
        raise PolicyError(
            f"approvers.{name}: the key must be Ed25519 or ECDSA P-256/P-384"
        )
    return Approver(name, public_key_id(key), key, section.public_key)


def _rule(section: RuleSection, approvers: Mapping[str, Approver], index: int) -> Rule:
    where = f"rules[{index}] ({section.name!r})"
    ceremony = None
    if section.mode == "ceremonial":
        if section.ceremony is None:
            raise PolicyError(
                f"{where}: a ceremonial rule needs a [rules.ceremony] table"
            )
        names = section.ceremony.approvers
        unknown = [n for n in names if n not in approvers]
        if unknown:
            raise PolicyError(f"{where}: unknown approvers {', '.join(unknown)}")
        if len(set(names)) != len(names):
            raise PolicyError(f"{where}: an approver is listed twice")
        chosen = tuple(approvers[n] for n in names)
        if len({a.key_id for a in chosen}) != len(chosen):
            raise PolicyError(f"{where}: two approvers share one key")
        if section.ceremony.threshold > len(chosen):
            raise PolicyError(
                f"{where}: threshold {section.ceremony.threshold} is more than the "
                f"{len(chosen)} approvers listed"
            )
        ceremony = Ceremony(
            chosen, section.ceremony.threshold, section.ceremony.expires_seconds
        )
    elif section.ceremony is not None:
        raise PolicyError(f"{where}: [rules.ceremony] needs mode = 'ceremonial'")
    quorum = None
    if section.quorum is not None:
        quorum = Quorum(section.quorum.builders, section.quorum.window_seconds)
    return Rule(
        name=section.name,
        mode=section.mode,
        match={claim: _patterns(p) for claim, p in section.match.items()},
        artifacts=_patterns(section.artifacts),
        keys=_patterns(section.keys),
        require_claims=tuple(section.require.claims),
        protected_ref=section.require.protected_ref,
        quorum=quorum,
        ceremony=ceremony,
        description=section.description,
    )


def _lint(rules: Sequence[Rule]) -> list[str]:
    warnings = []
    for index, rule in enumerate(rules):
        if not rule.match:
            warnings.append(f"rule {rule.name!r} matches every identity")
        for name, pinned in _MUTABLE_NAMES.items():
            if name in rule.match and pinned not in rule.match:
                warnings.append(
                    f"rule {rule.name!r} matches {name} by name only: names can be "
                    f"renamed and reused; pin {pinned} as well"
                )
        if rule.match and "issuer" not in rule.match:
            warnings.append(f"rule {rule.name!r} matches claims of any issuer")
        catch_all = (
            not rule.match
            and any(p.text == "*" for p in rule.artifacts)
            and any(p.text == "*" for p in rule.keys)
        )
        if catch_all and index + 1 < len(rules):
            later = ", ".join(repr(r.name) for r in rules[index + 1 :])
            warnings.append(
                f"rule {rule.name!r} applies to every request: rules after it "
                f"({later}) are never reached"
            )
    return warnings


def parse_policy(text: bytes, source: str = "<policy>") -> Policy:
    """Parse and validate a policy file's bytes; raise `PolicyError` if unusable."""
    try:
        raw = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{source} is not UTF-8: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{source} is not valid TOML: {exc}") from exc
    try:
        parsed = PolicyFile.model_validate(raw)
    except ValidationError as exc:
        raise PolicyError(
            f"{source} is not a valid policy:\n{_validation_message(exc)}"
        ) from exc
    names = [r.name for r in parsed.rules]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PolicyError(f"{source}: rule names must be unique: {', '.join(repeated)}")
    approvers = {name: _approver(name, s) for name, s in parsed.approvers.items()}
    rules = tuple(_rule(r, approvers, i) for i, r in enumerate(parsed.rules))
    rate = parsed.rate_limit
    return Policy(
        rules=rules,
        sha256=hashlib.sha256(text).hexdigest(),
        source=source,
        protected_refs=tuple(Pattern.compile(p) for p in parsed.protected_refs),
        rate_limit=None
        if rate is None
        else RateLimit(rate.requests_per_minute / 60, rate.burst),
        approvers=approvers,
        warnings=tuple(_lint(rules)),
    )


def load_policy(path: Path) -> Policy:
    """Read and parse a policy file."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read policy file {path}: {exc}") from exc
    return parse_policy(text, str(path))


def builtin_policy() -> Policy:
    """The policy without a file: the bootstrap token signs with any key."""
    rule = Rule(
        name=BUILTIN_RULE,
        mode="automated",
        match={
            "issuer": (Pattern.compile(TOKEN_ISSUER),),
            "subject": (Pattern.compile("bootstrap"),),
        },
        artifacts=(Pattern.compile("*"),),
        keys=(Pattern.compile("*"),),
    )
    return Policy(
        rules=(rule,),
        sha256=hashlib.sha256(BUILTIN_POLICY_TEXT).hexdigest(),
        source="<built-in>",
    )
