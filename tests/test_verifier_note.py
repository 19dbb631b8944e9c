"""Signed notes against the Go reference key and checkpoint, and strictness."""

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

from verifier.errors import FormatError, VerificationError
from verifier.note import (
    MAX_NOTE_SIZE,
    Note,
    NoteSignature,
    NoteVerifier,
    ed25519_key_id,
    format_note,
    open_note,
    parse_note,
    parse_signer_key,
    signature_line,
    verifier_key,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "tlog-vectors.json").read_text()
)
CHECKPOINT = VECTORS["checkpoint_300"].encode()
SKEY: str = VECTORS["note_skey"]
VKEY: str = VECTORS["note_vkey"]
EM = "\N{EM DASH}"


def sign(text: str, name: str, seed: bytes) -> NoteSignature:
    key = Ed25519PrivateKey.from_private_bytes(seed)
    public = key.public_key().public_bytes_raw()
    return NoteSignature(name, ed25519_key_id(name, public), key.sign(text.encode()))


def other_key(name: str, n: int) -> tuple[NoteVerifier, bytes]:
    seed = bytes([n]) * 32
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    return NoteVerifier(name, public), seed


def test_signer_key_reproduces_the_go_checkpoint() -> None:
    name, seed = parse_signer_key(SKEY)
    assert name == "example.com/log"
    assert seed == bytes(range(32))
    text = parse_note(CHECKPOINT).text
    assert format_note(text, [sign(text, name, seed)]) == CHECKPOINT


def test_verifier_key_matches_go() -> None:
    name, seed = parse_signer_key(SKEY)
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    assert verifier_key(name, public) == VKEY
    verifier = NoteVerifier.from_key(VKEY)
    assert (verifier.name, verifier.public_key) == (name, public)
    assert verifier.key_id == bytes.fromhex("d455c521")
    assert VKEY in repr(verifier)


def test_open_go_checkpoint() -> None:
    verifier = NoteVerifier.from_key(VKEY)
    note = open_note(CHECKPOINT, [verifier])
    assert (
        note.text
        == "example.com/log\n300\nYIKAzr3eSMKJmenLg58DmAo+Yui5VQqih1jpEnnr1lc=\n"
    )
    assert len(note.signatures) == 1
    sig = note.signatures[0]
    assert (sig.name, sig.key_id) == (verifier.name, verifier.key_id)
    verifier.verify(note.text, sig.signature)
    assert format_note(note.text, note.signatures) == CHECKPOINT
    assert signature_line(sig) == CHECKPOINT.decode().split("\n\n")[1]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d.replace(b"300", b"301"),
        lambda d: d.replace(b"example.com/log\n", b"example.com/log2\n", 1),
        lambda d: d.replace(b"YIKAzr3e", b"YIKAzr3f"),
        lambda d: d[:-10] + bytes([d[-10] ^ 1]) + d[-9:],
    ],
)
def test_tampered_checkpoint_fails(tamper: Any) -> None:
    with pytest.raises(VerificationError):
        open_note(tamper(CHECKPOINT), [NoteVerifier.from_key(VKEY)])


def test_open_note_rules() -> None:
    verifier = NoteVerifier.from_key(VKEY)
    _, seed = parse_signer_key(SKEY)
    text = "hello\n"
    good = sign(text, verifier.name, seed)
    witness, witness_seed = other_key("witness.example", 7)
    cosig = sign(text, witness.name, witness_seed)
    unknown = NoteSignature("someone.else", b"\x00\x01\x02\x03", b"\x55" * 64)

    # Unknown signatures are ignored and left out of the result.
    note = open_note(format_note(text, [unknown, good]), [verifier])
    assert note == Note(text, (good,))
    # Two known keys: both are checked and returned.
    note = open_note(format_note(text, [good, cosig, good]), [verifier, witness])
    assert note.signatures == (good, cosig)
    # No known signature at all.
    with pytest.raises(VerificationError):
        open_note(format_note(text, [unknown]), [verifier])
    with pytest.raises(VerificationError):
        open_note(format_note(text, [good]), [])
    # A known key with a bad signature fails, even next to a good one.
    bad = NoteSignature(good.name, good.key_id, bytes(64))
    with pytest.raises(VerificationError):
        open_note(format_note(text, [good, bad]), [verifier])
    short = NoteSignature(good.name, good.key_id, good.signature[:-1])
    with pytest.raises(VerificationError):
        open_note(format_note(text, [short]), [verifier])
    # Same name, other key: the key ID differs, so it is unknown.
    impostor, impostor_seed = other_key(verifier.name, 9)
    with pytest.raises(VerificationError):
        open_note(
            format_note(text, [sign(text, impostor.name, impostor_seed)]), [verifier]
        )
    # Right key, wrong name: the key ID differs too.
    renamed = NoteSignature("example.com/other", good.key_id, good.signature)
    with pytest.raises(VerificationError):
        open_note(format_note(text, [renamed]), [verifier])


def test_verify_raises() -> None:
    verifier = NoteVerifier.from_key(VKEY)
    with pytest.raises(VerificationError):
        verifier.verify("hello\n", bytes(64))
    with pytest.raises(VerificationError):
        verifier.verify("hello\n", b"")


SIG = EM + " example.com/log " + base64.b64encode(b"\x01\x02\x03\x04\x05").decode()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"text\n",
        b"text\n\n",
        ("text\n\n" + SIG).encode(),  # no final newline
        ("text\n" + SIG + "\n").encode(),  # no blank line
        ("text\n\n" + SIG + "\n\n").encode(),
        ("text\n\n" + SIG + "\n" + SIG).encode(),
        (b"text\n\n- example.com/log AQIDBAU=\n"),  # hyphen, not em dash
        ("text\n\n" + EM + "example.com/log AQIDBAU=\n").encode(),
        ("text\n\n" + EM + " example.com/log  AQIDBAU=\n").encode(),
        ("text\n\n" + EM + " example.com/log AQIDBAU= \n").encode(),
        ("text\n\n" + EM + " example.com/log\n").encode(),
        ("text\n\n" + EM + " example.com/log \n").encode(),
        ("text\n\n" + EM + "  AQIDBAU=\n").encode(),  # empty name
        ("text\n\n" + EM + " a+b AQIDBAU=\n").encode(),  # plus in name
        ("text\n\n" + EM + " a\u00a0b AQIDBAU=\n").encode(),  # space in name
        ("text\n\n" + EM + " example.com/log AQIDBA==\n").encode(),  # 4 bytes
        ("text\n\n" + EM + " example.com/log AQIDBAU\n").encode(),  # no padding
        ("text\n\n" + EM + " example.com/log AQIDBAV=\n").encode(),  # non-canonical
        ("text\n\n" + EM + " example.com/log AQID\nBAU=\n").encode(),
        ("text\n\n" + EM + " example.com/log AQIDBAU=\r\n").encode(),
        ("te\rxt\n\n" + SIG + "\n").encode(),
        ("te\x00xt\n\n" + SIG + "\n").encode(),
        ("te\x7fxt\n\n" + SIG + "\n").encode(),
        ("te\txt\n\n" + SIG + "\n").encode(),
        b"te\xffxt\n\n" + (SIG + "\n").encode(),  # not UTF-8
        b"te\xed\xa0\x80xt\n\n" + (SIG + "\n").encode(),  # encoded surrogate
        ("text\n\n" + (SIG + "\n") * 101).encode(),
        b"x" * (MAX_NOTE_SIZE - 20) + ("\n\n" + SIG + "\n").encode(),
    ],
)
def test_malformed_notes(data: bytes) -> None:
    with pytest.raises(FormatError):
        parse_note(data)


def test_well_formed_edge_notes() -> None:
    note = parse_note(("text\n\n" + (SIG + "\n") * 100).encode())
    assert len(note.signatures) == 100
    # Blank lines in the text are fine: the signatures follow the last one.
    note = parse_note(("a\n\nb\n\n\n" + SIG + "\n").encode())
    assert note.text == "a\n\nb\n\n"
    assert parse_note(("\n\n" + SIG + "\n").encode()).text == "\n"
    unicode_name = EM + " ex\u00e4mple/\u2014log AQIDBAU=\n"
    assert parse_note(("t\u00e9xt\n\n" + unicode_name).encode()).signatures[0].name == (
        "ex\u00e4mple/\u2014log"
    )


@pytest.mark.parametrize(
    "vkey",
    [
        "",
        "example.com/log",
        "example.com/log+d455c521",
        "example.com/log+D455C521+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4",
        "example.com/log+d455c52+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4",
        "example.com/log+d455c522+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4",
        "example.com/log2+d455c521+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4",
        "example.com/log+d455c521+AgOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4",
        "example.com/log+d455c521+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVT",
        "example.com/log+d455c521+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG5",
        "example.com/log+d455c521+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4 ",
        " example.com/log+d455c521+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4",
        "+d455c521+AQOhB7/zzhC+HXDdGOdLwJln5NYwm6UNXx3chmQSVTG4",
        "PRIVATE+KEY+example.com/log+d455c521+AQABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f",
    ],
)
def test_malformed_verifier_keys(vkey: str) -> None:
    with pytest.raises(FormatError):
        NoteVerifier.from_key(vkey)


@pytest.mark.parametrize(
    "skey",
    [
        VKEY,
        SKEY.replace("PRIVATE+KEY+", "PRIVATE+KEY"),
        SKEY.replace("d455c521", "d455c522"),
        SKEY.replace("example.com/log", "example.com/other"),
        SKEY[:-1],
        SKEY.replace("+AQAB", "+AgAB"),
    ],
)
def test_malformed_signer_keys(skey: str) -> None:
    with pytest.raises(FormatError):
        parse_signer_key(skey)


def test_misuse_is_value_error() -> None:
    good = NoteSignature("a", b"\x00" * 4, b"\x01")
    with pytest.raises(ValueError):
        NoteSignature("a b", b"\x00" * 4, b"\x01")
    with pytest.raises(ValueError):
        NoteSignature("a", b"\x00" * 3, b"\x01")
    with pytest.raises(ValueError):
        NoteSignature("a", b"\x00" * 4, b"")
    with pytest.raises(ValueError):
        format_note("no newline", [good])
    with pytest.raises(ValueError):
        format_note("tab\t\n", [good])
    with pytest.raises(ValueError):
        format_note("text\n", [])
    with pytest.raises(ValueError):
        format_note("text\n", [good] * 101)
    with pytest.raises(ValueError):
        verifier_key("a+b", bytes(32))
    with pytest.raises(ValueError):
        NoteVerifier("a", bytes(31))


@given(st.binary(max_size=600))
def test_parse_note_bytes_only_raises_format_error(data: bytes) -> None:
    with contextlib.suppress(FormatError):
        parse_note(data)


# The UTF-8 codec leaves out surrogates.
NOTE_ALPHABET = st.characters(codec="utf-8")


@given(st.text(NOTE_ALPHABET, max_size=300))
def test_parse_note_text_only_raises_format_error(text: str) -> None:
    for data in (text, text + "\n\n" + SIG + "\n", "a\n\n" + EM + " " + text + "\n"):
        with contextlib.suppress(FormatError):
            parse_note(data.encode())


names = st.text(
    st.characters(codec="utf-8").filter(
        lambda c: c > " " and c not in "+\x7f" and not c.isspace()
    ),
    min_size=1,
    max_size=20,
)
signatures = st.builds(
    NoteSignature,
    names,
    st.binary(min_size=4, max_size=4),
    st.binary(min_size=1, max_size=80),
)
texts = st.text(
    st.characters(codec="utf-8").filter(lambda c: c == "\n" or " " <= c != "\x7f"),
    max_size=200,
).map(lambda s: s + "\n")


@given(texts, st.lists(signatures, min_size=1, max_size=5))
def test_format_parse_round_trip(text: str, sigs: list[NoteSignature]) -> None:
    data = format_note(text, sigs)
    note = parse_note(data)
    assert note == Note(text, tuple(sigs))
    assert format_note(note.text, note.signatures) == data


@given(
    st.lists(
        st.tuples(st.integers(0, len(CHECKPOINT)), st.binary(max_size=3)), max_size=4
    )
)
def test_mutated_checkpoint_only_raises_verifier_errors(
    edits: list[tuple[int, bytes]],
) -> None:
    data = CHECKPOINT
    for pos, insert in edits:
        data = data[:pos] + insert + data[pos + 1 :]
    verifier = NoteVerifier.from_key(VKEY)
    with contextlib.suppress(FormatError, VerificationError):
        open_note(data, [verifier])
