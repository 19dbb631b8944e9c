"""The leaf format: canonical JSON, strict validation and artifact signatures."""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.hashes import SHA256
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from verifier.errors import FormatError, VerificationError
from verifier.leaf import (
    MAX_LEAF_SIZE,
    Approval,
    Artifact,
    ArtifactSignature,
    Build,
    Identity,
    Leaf,
    Policy,
    Source,
    encode_leaf,
    parse_leaf,
    public_key_id,
    verify_artifact_signature,
)

DIGEST = hashlib.sha256(b"artifact bytes").digest()
HEX = "ab" * 32


def minimal() -> Leaf:
    return Leaf(
        artifact=Artifact(name="app.tar.gz", sha256=DIGEST.hex()),
        identity=Identity(issuer="https://ci.example", subject="repo:example/app"),
        policy=Policy(mode="automated", policy_sha256=HEX, rule="ci-main"),
        signature=ArtifactSignature(
            algorithm="ecdsa-p256-sha256", key_id=HEX, value="MEUCIQ=="
        ),
        timestamp=1700000000,
    )


def full() -> Leaf:
    return Leaf(
        artifact=Artifact(name="r\u00e9lease/app.tar.gz", sha256=DIGEST.hex(), size=0),
        build=Build(builder="github-actions", invocation="run 7"),
        identity=Identity(
            issuer="https://token.actions.githubusercontent.com",
            subject="repo:example/app:ref:refs/heads/main",
            claims={"zeta": "z", "alpha": "a", "\u00e9": "\u2014"},
        ),
        policy=Policy(
            approvals=(
                Approval(key_id=HEX, signature="AAAA"),
                Approval(key_id="cd" * 32, signature="AQID"),
            ),
            mode="ceremonial",
            policy_sha256=HEX,
            rule="release",
        ),
        signature=ArtifactSignature(
            algorithm="rsa-pss-sha256", key_id=HEX, value="AA=="
        ),
        source=Source(commit="0" * 40, ref="refs/tags/v1", repository="example/app"),
        timestamp=0,
    )


def test_minimal_leaf_encoding() -> None:
    data = encode_leaf(minimal())
    assert data == (
        b'{"artifact":{"name":"app.tar.gz","sha256":"' + DIGEST.hex().encode() + b'"},'
        b'"identity":{"claims":{},"issuer":"https://ci.example",'
        b'"subject":"repo:example/app"},'
        b'"policy":{"approvals":[],"mode":"automated","policy_sha256":"'
        + HEX.encode()
        + b'","rule":"ci-main"},'
        b'"signature":{"algorithm":"ecdsa-p256-sha256","key_id":"'
        + HEX.encode()
        + b'","value":"MEUCIQ=="},'
        b'"timestamp":1700000000,"version":1}'
    )
    assert b"null" not in data
    assert parse_leaf(data) == minimal()


def test_full_leaf_round_trip() -> None:
    data = encode_leaf(full())
    assert parse_leaf(data) == full()
    # Sorted keys, no whitespace, raw UTF-8: what Python's json writes the same way.
    as_json = json.loads(data)
    assert (
        data
        == json.dumps(
            as_json, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    )
    assert list(as_json["identity"]["claims"]) == ["alpha", "zeta", "\u00e9"]
    assert as_json["artifact"]["size"] == 0


def replace(data: bytes, old: str, new: str) -> bytes:
    assert old.encode() in data
    return data.replace(old.encode(), new.encode(), 1)


MINIMAL = encode_leaf(minimal())
FULL = encode_leaf(full())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{}",
        b"null",
        b"[]",
        MINIMAL + b"\n",
        b" " + MINIMAL,
        MINIMAL.replace(b",", b", "),
        replace(MINIMAL, '"timestamp":1700000000', '"timestamp":1700000000.0'),
        replace(MINIMAL, '"timestamp":1700000000', '"timestamp":1.7e9'),
        replace(MINIMAL, '"timestamp":1700000000', '"timestamp":"1700000000"'),
        replace(MINIMAL, '"timestamp":1700000000', '"timestamp":-1'),
        replace(MINIMAL, '"timestamp":1700000000', '"timestamp":01700000000'),
        replace(MINIMAL, '"timestamp":1700000000', '"timestamp":9223372036854775808'),
        replace(MINIMAL, '"version":1', '"version":2'),
        replace(MINIMAL, '"version":1', '"version":true'),
        replace(MINIMAL, '"version":1', '"version":1.0'),
        replace(MINIMAL, ',"version":1', ""),
        replace(MINIMAL, '"version":1', '"version":1,"version":1'),
        replace(MINIMAL, '"version":1', '"version":1,"extra":1'),
        replace(MINIMAL, '"name":"app.tar.gz"', '"name":"app.tar.gz","size":null'),
        replace(MINIMAL, '"name":"app.tar.gz"', '"name":"app.tar.gz","size":-1'),
        replace(MINIMAL, '"name":"app.tar.gz"', '"name":""'),
        replace(MINIMAL, '"name":"app.tar.gz"', '"name":"app\\u000a"'),
        replace(MINIMAL, '"name":"app.tar.gz"', '"name":"app\\u0085"'),
        replace(MINIMAL, '"name":"app.tar.gz"', '"name":"' + "a" * 1025 + '"'),
        replace(MINIMAL, '"name":"app.tar.gz"', '"name":"\\u0061pp.tar.gz"'),
        replace(MINIMAL, '"name":"app.tar.gz"', '"name":"app\\/tar.gz"'),
        replace(MINIMAL, '"name":"app.tar.gz"', '"name":"\\ud800"'),
        replace(
            MINIMAL, '"sha256":"' + DIGEST.hex(), '"sha256":"' + DIGEST.hex().upper()
        ),
        replace(MINIMAL, '"sha256":"' + DIGEST.hex(), '"sha256":"' + DIGEST.hex()[:-1]),
        replace(MINIMAL, '"mode":"automated"', '"mode":"manual"'),
        replace(MINIMAL, '"algorithm":"ecdsa-p256-sha256"', '"algorithm":"ed25519"'),
        replace(MINIMAL, '"value":"MEUCIQ=="', '"value":"MEUCIQ"'),
        replace(MINIMAL, '"value":"MEUCIQ=="', '"value":"MEUCIR=="'),
        replace(MINIMAL, '"value":"MEUCIQ=="', '"value":"MEUC-Q=="'),
        replace(MINIMAL, '"value":"MEUCIQ=="', '"value":""'),
        replace(MINIMAL, '"claims":{}', ""),
        replace(MINIMAL, '"claims":{}', '"claims":{"a":1},'),
        replace(
            MINIMAL,
            '"approvals":[]',
            '"approvals":[{"key_id":"ab","signature":"AA=="}]',
        ),
        replace(FULL, '"alpha":"a","zeta":"z"', '"zeta":"z","alpha":"a"'),
        replace(FULL, '"\u00e9":"\u2014"', '"\\u00e9":"\u2014"'),
        replace(FULL, '"build":{', '"build":{"extra":"x",'),
        b"\xff" + MINIMAL[1:],
        b"{" * 10000,
        b'{"a":' + b" " * MAX_LEAF_SIZE + b"1}",
    ],
)
def test_non_canonical_or_invalid_leaves(data: bytes) -> None:
    with pytest.raises(FormatError):
        parse_leaf(data)


def test_leaf_size_limit() -> None:
    leaf = minimal()
    padding_needed = MAX_LEAF_SIZE - len(MINIMAL)
    claims = {"k": "v" * (padding_needed - len('"k":""'))}
    exact = Leaf(
        artifact=leaf.artifact,
        identity=Identity(
            issuer=leaf.identity.issuer, subject=leaf.identity.subject, claims=claims
        ),
        policy=leaf.policy,
        signature=leaf.signature,
        timestamp=leaf.timestamp,
    )
    data = encode_leaf(exact)
    assert len(data) == MAX_LEAF_SIZE
    assert parse_leaf(data) == exact
    over = exact.model_copy(
        update={
            "identity": Identity(
                issuer=leaf.identity.issuer + "x",
                subject=leaf.identity.subject,
                claims=claims,
            )
        }
    )
    with pytest.raises(ValueError):
        encode_leaf(over)


def test_model_validation() -> None:
    with pytest.raises(ValidationError):
        Artifact(name="a", sha256="AB" * 32)
    with pytest.raises(ValidationError):
        Artifact(name="a\x00", sha256=HEX)
    with pytest.raises(ValidationError):
        Artifact(name="a", sha256=HEX, size=-1)
    with pytest.raises(ValidationError):
        Artifact(name="a", sha256=HEX, size=True)
    with pytest.raises(ValidationError):
        Approval(key_id=HEX, signature="AAA")
    with pytest.raises(ValidationError):
        Leaf.model_validate_json(MINIMAL[:-1] + b',"extra":1}')
    leaf = minimal()
    with pytest.raises(ValidationError):
        leaf.timestamp = 5
    with pytest.raises(ValueError):
        encode_leaf(
            leaf.model_copy(
                update={"artifact": Artifact.model_construct(name="\ud800", sha256=HEX)}
            )
        )


@given(st.binary(max_size=400))
def test_parse_leaf_bytes_only_raises_format_error(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_leaf(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(st.sampled_from(sorted(json.loads(FULL))), json_values)
def test_parse_leaf_with_a_field_replaced(field: str, value: Any) -> None:
    document = json.loads(FULL)
    document[field] = value
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    with contextlib.suppress(FormatError):
        leaf = parse_leaf(data)
        assert encode_leaf(leaf) == data


@given(
    st.lists(st.tuples(st.integers(0, len(FULL)), st.binary(max_size=2)), max_size=3)
)
def test_mutated_leaf_only_raises_format_error(edits: list[tuple[int, bytes]]) -> None:
    data = FULL
    for pos, insert in edits:
        data = data[:pos] + insert + data[pos + 1 :]
    with contextlib.suppress(FormatError):
        assert encode_leaf(parse_leaf(data)) == data


printable = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
    min_size=1,
    max_size=40,
)


@given(
    printable,
    st.one_of(st.none(), st.integers(0, (1 << 63) - 1)),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4),
    st.one_of(st.none(), st.builds(Source, commit=st.one_of(st.none(), st.text()))),
    st.integers(0, (1 << 63) - 1),
)
def test_leaf_round_trip(
    name: str,
    size: int | None,
    claims: dict[str, str],
    source: Source | None,
    timestamp: int,
) -> None:
    leaf = full().model_copy(
        update={
            "artifact": Artifact(name=name, sha256=HEX, size=size),
            "identity": Identity(issuer="i", subject="s", claims=claims),
            "source": source,
            "timestamp": timestamp,
        }
    )
    try:
        data = encode_leaf(leaf)
    except ValueError:
        return  # lone surrogates in free text cannot be encoded
    assert parse_leaf(data) == leaf


# Keys are generated once; RSA generation is the slow part.
EC256 = ec.generate_private_key(ec.SECP256R1())
EC384 = ec.generate_private_key(ec.SECP384R1())
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PSS = padding.PSS(mgf=padding.MGF1(SHA256()), salt_length=32)


def signatures() -> list[tuple[Any, str, bytes]]:
    prehashed = Prehashed(SHA256())
    return [
        (EC256, "ecdsa-p256-sha256", EC256.sign(DIGEST, ec.ECDSA(prehashed))),
        (EC384, "ecdsa-p384-sha256", EC384.sign(DIGEST, ec.ECDSA(prehashed))),
        (RSA, "rsa-pkcs1v15-sha256", RSA.sign(DIGEST, padding.PKCS1v15(), prehashed)),
        (RSA, "rsa-pss-sha256", RSA.sign(DIGEST, PSS, prehashed)),
    ]


def test_artifact_signatures() -> None:
    for key, algorithm, signature in signatures():
        public = key.public_key()
        verify_artifact_signature(public, algorithm, DIGEST, signature)
        # The signature is over the artifact's SHA-256, as openssl dgst -sha256 makes.
        other = hashlib.sha256(b"other").digest()
        with pytest.raises(VerificationError):
            verify_artifact_signature(public, algorithm, other, signature)
        with pytest.raises(VerificationError):
            verify_artifact_signature(public, algorithm, DIGEST, signature[:-1])
        with pytest.raises(VerificationError):
            verify_artifact_signature(public, algorithm, DIGEST, b"")
        with pytest.raises(VerificationError):
            verify_artifact_signature(public, "ed25519", DIGEST, signature)
        for other_key, _, _ in signatures():
            if other_key is not key:
                with pytest.raises(VerificationError):
                    verify_artifact_signature(
                        other_key.public_key(), algorithm, DIGEST, signature
                    )
        with pytest.raises(ValueError):
            verify_artifact_signature(public, algorithm, DIGEST[:20], signature)


def test_pss_needs_a_32_byte_salt() -> None:
    signature = RSA.sign(
        DIGEST,
        padding.PSS(mgf=padding.MGF1(SHA256()), salt_length=padding.PSS.MAX_LENGTH),
        Prehashed(SHA256()),
    )
    with pytest.raises(VerificationError):
        verify_artifact_signature(RSA.public_key(), "rsa-pss-sha256", DIGEST, signature)


def test_public_key_id() -> None:
    public = EC256.public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public_key_id(public) == hashlib.sha256(der).hexdigest()
    assert len(public_key_id(RSA.public_key())) == 64


def test_signature_over_the_artifact_bytes_verifies_with_its_digest() -> None:
    # What `openssl dgst -sha256 -sign` makes: a signature over the file itself.
    data = b"artifact bytes"
    ecdsa = EC256.sign(data, ec.ECDSA(SHA256()))
    verify_artifact_signature(EC256.public_key(), "ecdsa-p256-sha256", DIGEST, ecdsa)
    pkcs1 = RSA.sign(data, padding.PKCS1v15(), SHA256())
    verify_artifact_signature(RSA.public_key(), "rsa-pkcs1v15-sha256", DIGEST, pkcs1)
    pss = RSA.sign(data, PSS, SHA256())
    verify_artifact_signature(RSA.public_key(), "rsa-pss-sha256", DIGEST, pss)
