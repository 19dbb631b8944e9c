"""Property-based fuzzing of the parsers of untrusted bytes not fuzzed elsewhere.

Already fuzzed next to their unit tests: checkpoint bodies and signed
checkpoints (test_verifier_checkpoint), notes (test_verifier_note), leaves
(test_verifier_leaf), tile paths, entry bundles and hash tiles
(test_verifier_tiles). Here, each parser below may only fail with its own
error type, never with anything else (a crash of the server or the
verifier), and what it accepts must round-trip:

- verifier: bundles and tlog-proofs, verifier keys, artifact public keys;
- server: request bodies (and the leaf built from any accepted one must
  pass the verifier's strict parser), the Authorization header, tokens
  files, policy files and their patterns, OIDC ID tokens (JWTs) and JWKS
  documents.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from logserver.auth import (
    Authenticator,
    Identity,
    TokenAuthenticator,
    TokensFileError,
    bearer_value,
    parse_tokens_file,
)
from logserver.config import OidcConfig, OidcIssuerConfig
from logserver.errors import ApiError, Unauthorized
from logserver.leaves import PolicyDecision, build_leaf, dedup_key
from logserver.models import BatchSubmitRequest, SubmitRequest, VoteRequest
from logserver.oidc import OidcVerifier, _parse_jwks
from logserver.policy import Pattern, PolicyError, parse_policy
from signer.keys import ECDSA_P256_SHA256
from signer.software import SoftwareArtifactSigner, generate_artifact_key
from tests.faults import env_int
from tests.govern import AUDIENCE, GITHUB, Issuer
from verifier.bundle import Bundle, TlogProof, parse_bundle, parse_tlog_proof
from verifier.errors import FormatError
from verifier.leaf import MAX_LEAF_SIZE, encode_leaf, parse_leaf
from verifier.note import NoteVerifier, verifier_key
from verifier.verify import load_artifact_key

# LOGSIGN_FUZZ_EXAMPLES raises the examples per property for long runs.
EXAMPLES = env_int("LOGSIGN_FUZZ_EXAMPLES", 150)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# For the slower properties (an RSA signature or a TOML document an example).
FUZZ_SLOW = settings(FUZZ, max_examples=max(1, EXAMPLES * 2 // 5))

# Text as an HTTP server hands it over: any bytes, undecodable ones as
# surrogate escapes (aiohttp decodes headers this way).
wire_text = st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape"))
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- Verifier: bundles and tlog-proofs -----------------------------------------

hashes = st.lists(st.binary(min_size=32, max_size=32), max_size=8)
proofs = st.builds(
    TlogProof,
    index=st.integers(0, (1 << 63) - 1),
    hashes=hashes.map(tuple),
    checkpoint=st.text(min_size=1, max_size=80).map(lambda t: t.encode()),
    extra=st.none() | st.binary(max_size=40),
)


@FUZZ
@given(st.binary(max_size=600))
def test_parse_bundle_bytes_only_raises_format_error(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_bundle(data)


@FUZZ
@given(json_values)
def test_parse_bundle_json_only_raises_format_error(value: Any) -> None:
    with contextlib.suppress(FormatError):
        parse_bundle(json.dumps(value).encode())


@FUZZ
@given(wire_text)
def test_parse_tlog_proof_only_raises_format_error(text: str) -> None:
    with contextlib.suppress(FormatError):
        parse_tlog_proof(text)


@FUZZ
@given(st.binary(max_size=200), proofs)
def test_bundle_round_trip(leaf: bytes, proof: TlogProof) -> None:
    if "\n\n" in proof.checkpoint.decode() or proof.checkpoint.startswith(b"\n"):
        return  # a checkpoint note never holds a blank line before its end
    bundle = Bundle(leaf, proof)
    assert parse_bundle(bundle.to_json()) == bundle


@FUZZ
@given(proofs, st.data())
def test_mutated_tlog_proof_only_raises_format_error(
    proof: TlogProof, data: st.DataObject
) -> None:
    text = proof.to_text()
    at = data.draw(st.integers(0, len(text)))
    insert = data.draw(st.text(alphabet="\n 0x+/=a-", max_size=3))
    cut = data.draw(st.integers(0, 3))
    with contextlib.suppress(FormatError):
        parse_tlog_proof(text[:at] + insert + text[at + cut :])


# --- Verifier: keys ------------------------------------------------------------


@FUZZ
@given(wire_text)
def test_verifier_key_text_only_raises_format_error(text: str) -> None:
    with contextlib.suppress(FormatError):
        NoteVerifier.from_key(text)


@FUZZ
@given(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1).filter(
        lambda n: "+" not in n
    ),
    st.binary(min_size=32, max_size=32),
    st.data(),
)
def test_verifier_key_round_trip_and_near_misses(
    name: str, key: bytes, data: st.DataObject
) -> None:
    text = verifier_key(name, key)
    parsed = NoteVerifier.from_key(text)
    assert (parsed.name, parsed.public_key) == (name, key)
    at = data.draw(st.integers(0, len(text) - 1))
    flipped = text[:at] + data.draw(st.sampled_from("+A/=0 ")) + text[at + 1 :]
    try:
        again = NoteVerifier.from_key(flipped)
    except FormatError:
        return
    assert verifier_key(again.name, again.public_key) == flipped


@FUZZ
@given(st.binary(max_size=400))
def test_artifact_public_key_only_raises_format_error(pem: bytes) -> None:
    wrapped = b"-----BEGIN PUBLIC KEY-----\n" + base64.encodebytes(pem)
    for candidate in (pem, wrapped + b"-----END PUBLIC KEY-----\n"):
        with contextlib.suppress(FormatError):
            load_artifact_key(candidate)


# --- Server: request bodies and the leaves built from them ---------------------

SIGNER = SoftwareArtifactSigner(
    "default", ECDSA_P256_SHA256, generate_artifact_key(ECDSA_P256_SHA256)
)
IDENTITY = Identity("logserver/token", "bootstrap")
DECISION = PolicyDecision("builtin-bootstrap-token", "0" * 64)


@FUZZ
@given(st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()))
def test_request_bodies_only_raise_validation_error(body: bytes) -> None:
    for model in (SubmitRequest, BatchSubmitRequest, VoteRequest):
        with contextlib.suppress(ValidationError):
            model.model_validate_json(body)


# Text that the request schema may accept: any character, control ones too.
claim_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
submissions = st.fixed_dictionaries(
    {"artifact": st.fixed_dictionaries(
        {"name": claim_text, "sha256": st.binary(min_size=32, max_size=32).map(
            bytes.hex)},
        optional={"size": st.integers(-1, 1 << 64) | st.none()},
    )},
    optional={
        "source": st.none() | st.fixed_dictionaries(
            {}, optional={k: claim_text | st.none()
                          for k in ("repository", "commit", "ref")}),
        "build": st.none() | st.fixed_dictionaries(
            {}, optional={k: claim_text | st.none()
                          for k in ("builder", "invocation")}),
    },
)  # fmt: skip


@FUZZ
@given(submissions)
def test_every_accepted_request_makes_a_leaf_the_verifier_accepts(
    body: dict[str, Any],
) -> None:
    """The server's schema and the verifier's leaf parser agree."""
    try:
        request = SubmitRequest.model_validate_json(json.dumps(body))
    except ValidationError:
        return
    leaf = build_leaf(request, IDENTITY, DECISION, SIGNER, b"\x30\x06signed")
    assert len(leaf) <= MAX_LEAF_SIZE
    parsed = parse_leaf(leaf)
    assert encode_leaf(parsed) == leaf
    assert parsed.artifact.name == request.artifact.name
    again = SubmitRequest.model_validate_json(json.dumps(body))
    assert dedup_key(request, IDENTITY, SIGNER) == dedup_key(again, IDENTITY, SIGNER)


def test_the_largest_request_still_fits_a_leaf() -> None:
    """Every text field at 1,024 four-byte characters: under 65,535 bytes."""
    big = "\U0001f512" * 1024
    request = SubmitRequest.model_validate(
        {
            "artifact": {"name": big, "sha256": "0" * 64, "size": 2**63 - 1},
            "source": {"repository": big, "commit": big, "ref": big},
            "build": {"builder": big, "invocation": big},
        }
    )
    leaf = build_leaf(request, IDENTITY, DECISION, SIGNER, b"\x30" * 140)
    assert len(leaf) < MAX_LEAF_SIZE // 2
    parse_leaf(leaf)


# --- Server: credentials -------------------------------------------------------


@FUZZ
@given(wire_text)
def test_authorization_header_is_a_token_or_401(value: str) -> None:
    tokens = TokenAuthenticator()
    tokens.add_token("the-real-token", "bootstrap")
    for header in (value, "Bearer " + value, "bearer  " + value + " "):
        with contextlib.suppress(Unauthorized):
            bearer_value(header)
            tokens.authenticate(header)


@FUZZ
@given(st.text(max_size=300))
def test_tokens_file_only_raises_tokens_file_error(text: str) -> None:
    try:
        entries = parse_tokens_file(text, "tokens")
    except TokensFileError:
        return
    assert all(len(digest) == 32 for _, digest in entries)


@pytest.fixture(scope="module")
def oidc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Authenticator, Issuer]:
    issuer = Issuer()
    jwks = tmp_path_factory.mktemp("jwks") / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    settings_ = OidcConfig(
        issuers=[
            OidcIssuerConfig(
                issuer=GITHUB, audience=AUDIENCE, provider="github", jwks_file=jwks
            )
        ]
    )
    return Authenticator(TokenAuthenticator(), OidcVerifier(settings_, None)), issuer


def _segment(value: Any) -> str:
    raw = json.dumps(value).encode() if not isinstance(value, bytes) else value
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


jwt_parts = json_values | st.binary(max_size=40)


@FUZZ_SLOW
@given(
    st.one_of(
        wire_text.map(lambda t: t + ".." if t.count(".") != 2 else t),
        st.tuples(jwt_parts, jwt_parts, st.binary(max_size=64)).map(
            lambda p: f"{_segment(p[0])}.{_segment(p[1])}.{_segment(p[2])}"
        ),
        st.tuples(
            st.fixed_dictionaries(
                {"alg": st.sampled_from(["RS256", "none", "HS256", "ES256", "x"])},
                optional={"kid": json_values, "typ": json_values},
            ),
            st.fixed_dictionaries(
                {"iss": st.just(GITHUB) | json_values},
                optional={
                    k: json_values
                    for k in ("sub", "aud", "exp", "iat", "nbf", "ref", "sha")
                },
            ),
        ).map(lambda p: f"{_segment(p[0])}.{_segment(p[1])}.{_segment(b'sig')}"),
    )
)
def test_jwts_are_an_identity_or_a_client_error(
    oidc: tuple[Authenticator, Issuer], token: str
) -> None:
    """Whatever the Authorization header holds, as the write routes see it."""
    authenticator, _ = oidc
    try:
        asyncio.run(authenticator.authenticate("Bearer " + token))
    except ApiError as exc:
        assert exc.status in (401, 422), exc


@FUZZ_SLOW
@given(st.dictionaries(st.sampled_from(["sub", "ref", "sha", "repository_id",
                                        "ref_protected", "aud", "exp"]),
                       json_values, max_size=5))  # fmt: skip
def test_signed_jwts_with_odd_claims_are_an_identity_or_a_client_error(
    oidc: tuple[Authenticator, Issuer], claims: dict[str, Any]
) -> None:
    """Claims of every JSON type, in a token whose signature does verify."""
    authenticator, issuer = oidc
    try:
        token = issuer.token(**claims)
    except (TypeError, ValueError, jwt.PyJWTError):
        return  # PyJWT refuses to make it (an aud that is not a string, ...)
    try:
        identity = asyncio.run(authenticator.authenticate("Bearer " + token))
    except ApiError as exc:
        assert exc.status in (401, 422), exc
        return
    assert identity.issuer == GITHUB
    assert all(isinstance(v, str) for v in identity.claims.values())


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_jwks_documents_only_raise_value_error(document: bytes) -> None:
    with contextlib.suppress(ValueError):
        _parse_jwks(document)


@FUZZ_SLOW
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=4))
def test_jwks_with_odd_keys_only_raise_value_error(extra: dict[str, Any]) -> None:
    for keys in ([extra], extra, [{"kty": "RSA", **extra}], [{"kty": "EC", **extra}]):
        with contextlib.suppress(ValueError):
            _parse_jwks(json.dumps({"keys": keys}).encode())


# --- Server: policy files ------------------------------------------------------


@FUZZ
@given(st.binary(max_size=400))
def test_policy_bytes_only_raise_policy_error(text: bytes) -> None:
    with contextlib.suppress(PolicyError):
        parse_policy(text)


def _toml(value: Any) -> str:
    """A TOML value for a JSON-like value (enough for fuzzing)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and value == value and abs(value) != float("inf"):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        members = (f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items())
        return "{" + ", ".join(m for m in members if not m.endswith("= None")) + "}"
    return json.dumps(str(value))


rule_keys = st.sampled_from(
    ["name", "mode", "match", "artifacts", "keys", "require", "quorum",
     "ceremony", "description", "unknown"]
)  # fmt: skip


@FUZZ_SLOW
@given(
    st.dictionaries(
        st.sampled_from(["version", "protected_refs", "rate_limit", "approvers"]),
        json_values,
        max_size=3,
    ),
    st.lists(st.dictionaries(rule_keys, json_values, max_size=6), max_size=3),
)
def test_policy_structures_only_raise_policy_error(
    top: dict[str, Any], rules: list[dict[str, Any]]
) -> None:
    lines = [f"{k} = {_toml(v)}" for k, v in top.items() if v is not None]
    for rule in rules:
        lines.append("[[rules]]")
        lines += [f"{k} = {_toml(v)}" for k, v in rule.items() if v is not None]
    with contextlib.suppress(PolicyError):
        parse_policy("\n".join(lines).encode())


def _regex_matches(pattern: str, value: str) -> bool:
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, value, re.DOTALL) is not None


@FUZZ
@given(st.text("ab*-.", max_size=8), st.text("ab-.", max_size=10))
def test_patterns_match_as_the_documented_glob(pattern: str, value: str) -> None:
    assert Pattern.compile(pattern).matches(value) == _regex_matches(pattern, value)


def test_patterns_take_linear_time_on_values_that_almost_match() -> None:
    """A regex of 4 wildcards takes minutes on this; a pattern must not."""
    pattern = Pattern.compile("*-*-*-*.tar.gz")
    began = time.perf_counter()
    for _ in range(100):
        assert not pattern.matches("-" * 1024)
    assert time.perf_counter() - began < 1.0
