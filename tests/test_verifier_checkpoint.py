"""Checkpoints: the Go reference checkpoint, round trips and strict parsing."""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from verifier.checkpoint import (
    MAX_TREE_SIZE,
    Checkpoint,
    SignedCheckpoint,
    open_checkpoint,
    parse_checkpoint_body,
    verify_checkpoint_consistency,
)
from verifier.errors import ConsistencyError, FormatError, VerificationError
from verifier.merkle import (
    EMPTY_ROOT,
    consistency_proof,
    leaf_hash,
    root_from_leaf_hashes,
)
from verifier.note import (
    NoteSignature,
    NoteVerifier,
    ed25519_key_id,
    format_note,
    parse_signer_key,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "tlog-vectors.json").read_text()
)
GO_CHECKPOINT = VECTORS["checkpoint_300"].encode()
NAME, SEED = parse_signer_key(VECTORS["note_skey"])
VERIFIER = NoteVerifier.from_key(VECTORS["note_vkey"])
ROOT = base64.b64encode(bytes(range(32))).decode()
HASHES = [leaf_hash(b"leaf-%d" % i) for i in range(300)]


def signed(text: str, name: str = NAME, seed: bytes = SEED) -> bytes:
    key = Ed25519PrivateKey.from_private_bytes(seed)
    key_id = ed25519_key_id(name, key.public_key().public_bytes_raw())
    return format_note(text, [NoteSignature(name, key_id, key.sign(text.encode()))])


def checkpoint_at(size: int) -> SignedCheckpoint:
    body = Checkpoint(NAME, size, root_from_leaf_hashes(HASHES[:size]))
    return open_checkpoint(signed(body.to_text()), VERIFIER)


def test_open_go_checkpoint() -> None:
    signed_checkpoint = open_checkpoint(GO_CHECKPOINT, VERIFIER)
    checkpoint = signed_checkpoint.checkpoint
    assert checkpoint.origin == "example.com/log"
    assert checkpoint.size == 300
    assert checkpoint.root_hash == root_from_leaf_hashes(HASHES)
    assert checkpoint.extensions == ()
    assert signed_checkpoint.raw == GO_CHECKPOINT
    assert signed_checkpoint.note.text == checkpoint.to_text()
    # Signing our own rendering of the body reproduces Go's bytes.
    assert signed(checkpoint.to_text()) == GO_CHECKPOINT


def test_tampered_go_checkpoint_fails() -> None:
    with pytest.raises(VerificationError):
        open_checkpoint(GO_CHECKPOINT.replace(b"\n300\n", b"\n301\n"), VERIFIER)


def test_origin_must_equal_key_name() -> None:
    body = Checkpoint("example.com/other", 1, bytes(32)).to_text()
    with pytest.raises(VerificationError):
        open_checkpoint(signed(body), VERIFIER)
    # Signed by another key under the origin's name: unknown key ID.
    other_seed = bytes(32)
    body = Checkpoint(NAME, 1, bytes(32)).to_text()
    with pytest.raises(VerificationError):
        open_checkpoint(signed(body, seed=other_seed), VERIFIER)


def test_signed_bad_body_is_format_error() -> None:
    with pytest.raises(FormatError):
        open_checkpoint(signed(f"{NAME}\n+300\n{ROOT}\n"), VERIFIER)


def test_round_trips() -> None:
    for checkpoint in [
        Checkpoint("o", 0, EMPTY_ROOT),
        Checkpoint("example.com/log", MAX_TREE_SIZE, bytes(32), ("ext one", "\u00e9")),
        Checkpoint("origin with space", 42, bytes(range(32))),
    ]:
        text = checkpoint.to_text()
        assert text.endswith("\n")
        assert parse_checkpoint_body(text) == checkpoint


def test_to_text() -> None:
    checkpoint = Checkpoint("example.com/log", 7, bytes(range(32)), ("x",))
    assert checkpoint.to_text() == f"example.com/log\n7\n{ROOT}\nx\n"


@pytest.mark.parametrize(
    "size",
    [
        "+42",
        "042",
        " 42",
        "42 ",
        "4_2",
        "\u0664\u0662",
        "0x2a",
        "-1",
        "",
        "4 2",
        "42.0",
        "1e3",
        "\uff14\uff12",
        str(MAX_TREE_SIZE + 1),
        "9" * 30,
    ],
)
def test_non_canonical_sizes(size: str) -> None:
    with pytest.raises(FormatError):
        parse_checkpoint_body(f"o\n{size}\n{ROOT}\n")


@pytest.mark.parametrize(
    "root",
    [
        ROOT[:-1],  # no padding
        ROOT[:-2] + "9=",  # padding bits set: decodes, but not canonical
        ROOT[:-2] + "=",
        ROOT + "=",
        ROOT.replace("A", "-"),
        " " + ROOT,
        ROOT + " ",
        base64.b64encode(bytes(31)).decode(),
        base64.b64encode(bytes(33)).decode(),
        base64.urlsafe_b64encode(bytes([0xFB]) * 32).decode(),
        "",
    ],
)
def test_bad_root_hashes(root: str) -> None:
    with pytest.raises(FormatError):
        parse_checkpoint_body(f"o\n42\n{root}\n")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        "o\n42\n",
        f"o\n42\n{ROOT}",  # no final newline
        f"\n42\n{ROOT}\n",  # empty origin
        f"o\n42\n{ROOT}\n\n",  # empty extension line
        f"o\n42\n{ROOT}\next\n\n",
        f"o\n42\n{ROOT}\n\next\n",
        f"o\r\n42\n{ROOT}\n",
        f"o\n42\r\n{ROOT}\n",
        f"o\n42\n{ROOT}\r\n",
        f"o\x00\n42\n{ROOT}\n",
    ],
)
def test_malformed_bodies(text: str) -> None:
    with pytest.raises(FormatError):
        parse_checkpoint_body(text)


def test_misuse_is_value_error() -> None:
    with pytest.raises(ValueError):
        Checkpoint("", 1, bytes(32))
    with pytest.raises(ValueError):
        Checkpoint("o", -1, bytes(32))
    with pytest.raises(ValueError):
        Checkpoint("o", 1, bytes(31))
    with pytest.raises(ValueError):
        Checkpoint("o", 1, bytes(32), ("",))
    with pytest.raises(ValueError):
        Checkpoint("o", 1, bytes(32), ("a\nb",))


def test_consistency_between_checkpoints() -> None:
    old, new = checkpoint_at(100), checkpoint_at(300)
    proof = consistency_proof(HASHES, 100, 300)
    verify_checkpoint_consistency(old, new, proof)
    verify_checkpoint_consistency(new, new, [])
    bad = [proof[0], *proof[2:]]
    with pytest.raises(ConsistencyError) as caught:
        verify_checkpoint_consistency(old, new, bad)
    error = caught.value
    assert (error.old, error.new, error.proof) == (old, new, tuple(bad))
    assert isinstance(error, VerificationError)
    assert str(error) == "checkpoints are not consistent"
    # A forked log: same size, other root.
    forked_body = Checkpoint(NAME, 300, bytes(32)).to_text()
    forked = open_checkpoint(signed(forked_body), VERIFIER)
    with pytest.raises(ConsistencyError):
        verify_checkpoint_consistency(new, forked, [])
    with pytest.raises(ConsistencyError):
        verify_checkpoint_consistency(new, old, proof)


def test_consistency_needs_one_origin() -> None:
    old = checkpoint_at(100)
    other = SignedCheckpoint(
        Checkpoint("example.com/other", 300, old.checkpoint.root_hash),
        old.note,
        old.raw,
    )
    with pytest.raises(VerificationError):
        verify_checkpoint_consistency(old, other, consistency_proof(HASHES, 100, 300))


@given(st.text(max_size=300))
def test_parse_body_only_raises_format_error(text: str) -> None:
    for body in (
        text,
        f"o\n{text}\n{ROOT}\n",
        f"o\n1\n{text}\n",
        f"o\n1\n{ROOT}\n{text}",
    ):
        with contextlib.suppress(FormatError):
            parse_checkpoint_body(body)


@given(st.binary(max_size=400))
def test_open_checkpoint_only_raises_verifier_errors(data: bytes) -> None:
    with contextlib.suppress(FormatError, VerificationError):
        open_checkpoint(data, VERIFIER)


@given(
    st.text(min_size=1, max_size=30).filter(lambda s: "\n" not in s),
    st.integers(0, MAX_TREE_SIZE),
    st.binary(min_size=32, max_size=32),
    st.lists(
        st.text(min_size=1, max_size=30).filter(lambda s: "\n" not in s), max_size=3
    ),
)
def test_body_round_trip(origin: str, size: int, root: bytes, ext: list[str]) -> None:
    try:
        checkpoint = Checkpoint(origin, size, root, tuple(ext))
    except ValueError:
        return  # control characters
    assert parse_checkpoint_body(checkpoint.to_text()) == checkpoint
