"""Signed notes, c2sp.org/signed-note, with Ed25519 keys.

A note is UTF-8 text ending in a newline, a blank line, and one or more
signature lines `— <name> <base64(4-byte key ID || signature)>`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from verifier.errors import FormatError, VerificationError

MAX_NOTE_SIZE = 1 << 20
MAX_SIGNATURES = 100
KEY_ID_SIZE = 4
ED25519_ALGORITHM = 0x01
ED25519_KEY_SIZE = 32
ED25519_SIGNATURE_SIZE = 64
MAX_KEY_SIZE = 4096

_SIGNATURE_PREFIX = "\N{EM DASH} "
_PRIVATE_KEY_PREFIX = "PRIVATE+KEY+"
_KEY_ID_HEX = re.compile(r"[0-9a-f]{8}")
# ASCII control characters other than newline, which no note may contain.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")


def _is_valid_name(name: str) -> bool:
    """A key name is non-empty with no spaces, no plus and no control characters."""
    return (
        name != ""
        and "+" not in name
        and not any(c.isspace() for c in name)
        and _CONTROL.search(name) is None
    )


def _decode_base64(text: str) -> bytes:
    """Decode standard padded base64 that re-encodes to exactly `text`."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise FormatError("malformed base64") from e
    if base64.b64encode(data).decode("ascii") != text:
        raise FormatError("non-canonical base64")
    return data


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: the key name, its 4-byte key ID and the signature."""

    name: str
    key_id: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not _is_valid_name(self.name):
            raise ValueError(f"invalid key name {self.name!r}")
        if len(self.key_id) != KEY_ID_SIZE:
            raise ValueError(f"key ID is {len(self.key_id)} bytes, not {KEY_ID_SIZE}")
        if not self.signature:
            raise ValueError("empty signature")


@dataclass(frozen=True)
class Note:
    """The text of a note (ending in a newline) and its signatures."""

    text: str
    signatures: tuple[NoteSignature, ...]

    def __post_init__(self) -> None:
        if not self.text.endswith("\n"):
            raise ValueError("note text must end with a newline")
        if _CONTROL.search(self.text):
            raise ValueError("note text contains control characters")


def signature_line(sig: NoteSignature) -> str:
    """`— <name> <base64(key ID || signature)>` and a newline."""
    encoded = base64.b64encode(sig.key_id + sig.signature).decode("ascii")
    return f"{_SIGNATURE_PREFIX}{sig.name} {encoded}\n"


def format_note(text: str, signatures: Sequence[NoteSignature]) -> bytes:
    """The note's bytes: text, a blank line and the signature lines."""
    note = Note(text, tuple(signatures))
    if not 1 <= len(note.signatures) <= MAX_SIGNATURES:
        raise ValueError(f"a note has 1 to {MAX_SIGNATURES} signatures")
    data = (text + "\n" + "".join(map(signature_line, note.signatures))).encode()
    if len(data) > MAX_NOTE_SIZE:
        raise ValueError(f"note is larger than {MAX_NOTE_SIZE} bytes")
    return data


def parse_note(data: bytes) -> Note:
    """Parse a signed note strictly, without checking its signatures."""
    if len(data) > MAX_NOTE_SIZE:
        raise FormatError("note is too large")
    try:
        msg = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError("note is not UTF-8") from e
    if _CONTROL.search(msg):
        raise FormatError("note contains control characters")
    # The signature block follows the last blank line.
    split = msg.rfind("\n\n")
    if split < 0:
        raise FormatError("note has no signature block")
    text, block = msg[: split + 1], msg[split + 2 :]
    if not block.endswith("\n"):
        raise FormatError("note has no signature block")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise FormatError("note has too many signatures")
    signatures = tuple(_parse_signature_line(line) for line in lines)
    return Note(text, signatures)


def _parse_signature_line(line: str) -> NoteSignature:
    if not line.startswith(_SIGNATURE_PREFIX):
        raise FormatError("malformed signature line")
    name, _, encoded = line[len(_SIGNATURE_PREFIX) :].partition(" ")
    if not _is_valid_name(name):
        raise FormatError("invalid key name in signature line")
    raw = _decode_base64(encoded)
    if len(raw) <= KEY_ID_SIZE:
        raise FormatError("signature is too short")
    return NoteSignature(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])


def ed25519_key_id(name: str, public_key: bytes) -> bytes:
    """SHA-256(name || 0x0A || 0x01 || public key)[:4]."""
    data = name.encode() + b"\n" + bytes([ED25519_ALGORITHM]) + public_key
    return hashlib.sha256(data).digest()[:KEY_ID_SIZE]


def verifier_key(name: str, public_key: bytes) -> str:
    """The verifier key text `<name>+<8 hex key ID>+<base64(0x01 || key)>`."""
    if not _is_valid_name(name):
        raise ValueError(f"invalid key name {name!r}")
    if len(public_key) != ED25519_KEY_SIZE:
        raise ValueError("an Ed25519 public key is 32 bytes")
    key = base64.b64encode(bytes([ED25519_ALGORITHM]) + public_key).decode("ascii")
    return f"{name}+{ed25519_key_id(name, public_key).hex()}+{key}"


def _parse_key(text: str) -> tuple[str, bytes, bytes]:
    """Split `<name>+<hex ID>+<base64(0x01 || key)>` into name, key ID and key."""
    if len(text) > MAX_KEY_SIZE:
        raise FormatError("key is too long")
    parts = text.split("+", 2)
    if len(parts) != 3:
        raise FormatError("malformed key")
    name, id_hex, encoded = parts
    if not _is_valid_name(name):
        raise FormatError("invalid key name")
    if not _KEY_ID_HEX.fullmatch(id_hex):
        raise FormatError("malformed key ID")
    key = _decode_base64(encoded)
    if len(key) != 1 + ED25519_KEY_SIZE or key[0] != ED25519_ALGORITHM:
        raise FormatError("not an Ed25519 key")
    return name, bytes.fromhex(id_hex), key[1:]


def parse_signer_key(skey: str) -> tuple[str, bytes]:
    """The name and Ed25519 seed of `PRIVATE+KEY+<name>+<hex ID>+<base64>`."""
    if not skey.startswith(_PRIVATE_KEY_PREFIX):
        raise FormatError("not a signer key")
    name, key_id, seed = _parse_key(skey[len(_PRIVATE_KEY_PREFIX) :])
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    if ed25519_key_id(name, public) != key_id:
        raise FormatError("signer key ID does not match the key")
    return name, seed


class NoteVerifier:
    """Checks note signatures made by one named Ed25519 key."""

    name: str
    key_id: bytes
    public_key: bytes

    def __init__(self, name: str, public_key: bytes) -> None:
        if not _is_valid_name(name):
            raise ValueError(f"invalid key name {name!r}")
        if len(public_key) != ED25519_KEY_SIZE:
            raise ValueError("an Ed25519 public key is 32 bytes")
        self.name = name
        self.public_key = public_key
        self.key_id = ed25519_key_id(name, public_key)
        self._key = Ed25519PublicKey.from_public_bytes(public_key)

    @classmethod
    def from_key(cls, vkey: str) -> NoteVerifier:
        """Parse a verifier key `<name>+<8 hex key ID>+<base64(0x01 || key)>`."""
        name, key_id, public_key = _parse_key(vkey)
        try:
            verifier = cls(name, public_key)
        except ValueError as e:
            raise FormatError("invalid verifier key") from e
        if verifier.key_id != key_id:
            raise FormatError("verifier key ID does not match the key")
        return verifier

    def __repr__(self) -> str:
        return f"NoteVerifier({verifier_key(self.name, self.public_key)!r})"

    def verify(self, text: str, signature: bytes) -> None:
        """Check an Ed25519 signature (without the key ID) over the note text."""
        if len(signature) != ED25519_SIGNATURE_SIZE:
            raise VerificationError("note signature does not verify")
        try:
            self._key.verify(signature, text.encode())
        except InvalidSignature as e:
            raise VerificationError("note signature does not verify") from e


def open_note(data: bytes, verifiers: Sequence[NoteVerifier]) -> Note:
    """Parse a note and check its signatures by the known verifiers.

    1. Parse the note strictly.
    2. Check every signature whose name and key ID match a known verifier;
       one that does not verify fails the note. Others are ignored.
    3. Require at least one checked signature.
    The returned note lists only the signatures that were checked.
    """
    # 1.
    note = parse_note(data)
    # 2.
    checked: list[NoteSignature] = []
    for sig in note.signatures:
        known = [v for v in verifiers if v.name == sig.name and v.key_id == sig.key_id]
        if not known:
            continue
        if not any(_verifies(v, note.text, sig.signature) for v in known):
            raise VerificationError("note signature does not verify")
        if sig not in checked:
            checked.append(sig)
    # 3.
    if not checked:
        raise VerificationError("note has no signature from a known key")
    return Note(note.text, tuple(checked))


def _verifies(verifier: NoteVerifier, text: str, signature: bytes) -> bool:
    try:
        verifier.verify(text, signature)
    except VerificationError:
        return False
    return True
