"""The signing worker: one process, one PKCS#11 login, one session, for life.

python-pkcs11 initialises the PKCS#11 library without locking callbacks, so
SoftHSM disables its own locking and two threads signing in one process crash
it. The log server therefore never loads the library: it starts one worker
process per session (with the "spawn" start method; a forked child would
inherit the parent's library state) and talks to it over a socket.

The worker logs in once and keeps that session open until its parent goes
away, because closing the logged-in session logs out every session of the
process. It checks every signature the HSM returns against the public key
before it lets it out, so the verification runs in parallel across workers.

The protocol is one request at a time, each frame a big-endian uint32 length
and a body that starts with a tag byte:

    parent -> worker   SIGN      items (digests, or one checkpoint message)
    worker -> parent   READY     the key's SubjectPublicKeyInfo DER
                       RESULT    one signature per item, in order
                       ERROR     one kind byte and a UTF-8 diagnosis

where items are a uint32 count followed by a uint32 length and the bytes of
each. A worker that reports an UNAVAILABLE error exits; its parent starts a
new one later.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    encode_dss_signature,
)
from pkcs11 import MGF, Mechanism
from pkcs11 import exceptions as p11

from signer import pkcs11_session as session_
from signer.keys import (
    ECDSA_P256_SHA256,
    ECDSA_P384_SHA256,
    RSA_PKCS1V15_SHA256,
    RSA_PSS_SHA256,
    SignerError,
    SignerUnavailable,
)
from signer.pkcs11_session import ED25519

TAG_SIGN = 1
TAG_READY = 2
TAG_RESULT = 3
TAG_ERROR = 4

ERROR_FAILED = 1  # this request failed; the worker carries on
ERROR_UNAVAILABLE = 2  # the session or token is gone; the worker exits

MAX_FRAME = 64 * 1024 * 1024
_U32 = struct.Struct(">I")

# DigestInfo for SHA-256 (RFC 8017, section 9.2, note 1): CKM_RSA_PKCS pads
# whatever it is given, so the prefix that names the hash has to be added here.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
DIGEST_SIZE = hashlib.sha256().digest_size

_PREHASHED = Prehashed(hashes.SHA256())
_ECDSA = ec.ECDSA(_PREHASHED)
_PSS_SALT = 32
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=_PSS_SALT)


class ProtocolError(Exception):
    """A frame that does not follow the worker protocol."""


def frame(tag: int, body: bytes = b"") -> bytes:
    return _U32.pack(1 + len(body)) + bytes([tag]) + body


def frame_length(header: bytes) -> int:
    length = int(_U32.unpack(header)[0])
    if not 1 <= length <= MAX_FRAME:
        raise ProtocolError(f"frame length {length} out of range")
    return length


def encode_items(items: Sequence[bytes]) -> bytes:
    parts = [_U32.pack(len(items))]
    for item in items:
        parts += (_U32.pack(len(item)), item)
    return b"".join(parts)


def decode_items(body: bytes) -> list[bytes]:
    view = memoryview(body)
    if len(view) < 4:
        raise ProtocolError("truncated item count")
    count = int(_U32.unpack_from(view, 0)[0])
    offset = 4
    items = []
    for _ in range(count):
        if offset + 4 > len(view):
            raise ProtocolError("truncated item length")
        length = int(_U32.unpack_from(view, offset)[0])
        offset += 4
        if offset + length > len(view):
            raise ProtocolError("truncated item")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise ProtocolError("trailing bytes after the items")
    return items


def encode_error(kind: int, message: str) -> bytes:
    return frame(TAG_ERROR, bytes([kind]) + message.encode("utf-8", "replace"))


def decode_error(body: bytes) -> SignerError:
    """The exception an ERROR frame body (after the tag) stands for."""
    if not body:
        raise ProtocolError("empty error")
    message = body[1:].decode("utf-8", "replace")
    if body[0] == ERROR_UNAVAILABLE:
        return SignerUnavailable(message)
    return SignerError(message)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to find its key: pickled into the spawned process.

    It names where the PIN is, never the PIN itself; the worker reads it.
    """

    module: str
    token_label: str
    key_label: str
    algorithm: str
    pin_env: str | None = None
    pin_file: str | None = None


def ecdsa_der(raw: bytes, curve: ec.EllipticCurve) -> bytes:
    """DER `ECDSA-Sig-Value` from the raw `r || s` that CKM_ECDSA returns."""
    size = (curve.key_size + 7) // 8
    if len(raw) != 2 * size:
        raise SignerError(f"ECDSA signature of {len(raw)} bytes, expected {2 * size}")
    r = int.from_bytes(raw[:size], "big")
    s = int.from_bytes(raw[size:], "big")
    return encode_dss_signature(r, s)


def verify_signature(
    algorithm: str, public_key: PublicKeyTypes, item: bytes, signature: bytes
) -> None:
    """Raise `SignerError` unless `signature` is `algorithm`'s over `item`.

    `item` is the SHA-256 digest for artifact algorithms and the message
    itself for Ed25519.
    """
    try:
        if algorithm == ED25519:
            assert isinstance(public_key, ed25519.Ed25519PublicKey)
            public_key.verify(signature, item)
        elif algorithm in (ECDSA_P256_SHA256, ECDSA_P384_SHA256):
            assert isinstance(public_key, ec.EllipticCurvePublicKey)
            public_key.verify(signature, item, _ECDSA)
        elif algorithm == RSA_PKCS1V15_SHA256:
            assert isinstance(public_key, rsa.RSAPublicKey)
            public_key.verify(signature, item, padding.PKCS1v15(), _PREHASHED)
        elif algorithm == RSA_PSS_SHA256:
            assert isinstance(public_key, rsa.RSAPublicKey)
            public_key.verify(signature, item, _PSS, _PREHASHED)
        else:
            raise SignerError(f"unknown signing algorithm {algorithm!r}")
    except InvalidSignature as exc:
        raise SignerError(
            "the HSM returned a signature that does not verify; withheld"
        ) from exc


class KeySigner:
    """Signs with one private key object and checks each result."""

    def __init__(
        self,
        algorithm: str,
        private: pkcs11.SignMixin,
        public_key: PublicKeyTypes,
    ) -> None:
        session_.check_key_fits(algorithm, public_key)
        self.algorithm = algorithm
        self.public_key = public_key
        self._private = private
        self._sign_raw = self._plan(algorithm, public_key)

    def _plan(
        self, algorithm: str, public_key: PublicKeyTypes
    ) -> Callable[[bytes], bytes]:
        # Each branch is one of the measured pitfalls in DESIGN.md.
        private = self._private
        if algorithm == ED25519:
            return lambda message: private.sign(message, mechanism=Mechanism.EDDSA)
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            # SoftHSM 2.6 has no CKM_ECDSA_SHA256: sign the digest with CKM_ECDSA,
            # which answers with raw r || s.
            curve = public_key.curve
            return lambda digest: ecdsa_der(
                private.sign(digest, mechanism=Mechanism.ECDSA), curve
            )
        if algorithm == RSA_PKCS1V15_SHA256:
            return lambda digest: private.sign(
                SHA256_DIGEST_INFO + digest, mechanism=Mechanism.RSA_PKCS
            )
        # PSS: python-pkcs11 would default to SHA-1, MGF1-SHA-1 and a 20-byte salt.
        param = (Mechanism.SHA256, MGF.SHA256, _PSS_SALT)
        return lambda digest: private.sign(
            digest, mechanism=Mechanism.RSA_PKCS_PSS, mechanism_param=param
        )

    def sign(self, items: Sequence[bytes]) -> list[bytes]:
        """Sign every item, then check every signature; all or nothing."""
        if self.algorithm != ED25519:
            for item in items:
                if len(item) != DIGEST_SIZE:
                    raise SignerError(f"a SHA-256 digest is 32 bytes, not {len(item)}")
        try:
            signatures = [self._sign_raw(item) for item in items]
        except p11.PKCS11Error as exc:
            raise session_.translate(exc, "the HSM refused to sign") from exc
        # Verifying apart from signing keeps each library's code in the CPU
        # caches: about 10% faster than alternating, measured with SoftHSM.
        for item, signature in zip(items, signatures, strict=True):
            verify_signature(self.algorithm, self.public_key, item, signature)
        return signatures


def load_signer(spec: WorkerSpec) -> tuple[pkcs11.Session, KeySigner]:
    """Log in and find the key: the session must stay open while it signs."""
    pin = session_.read_pin(spec.pin_env, spec.pin_file)
    session = session_.open_session(spec.module, spec.token_label, pin)
    del pin
    try:
        private, public = session_.find_key_pair(session, spec.key_label)
        signer = KeySigner(spec.algorithm, private, session_.public_key_of(public))
    except BaseException:
        session.close()
        raise
    return session, signer


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = sock.recv(size - len(buffer))
        if not chunk:
            return None
        buffer += chunk
    return bytes(buffer)


def _recv_frame(sock: socket.socket) -> bytes | None:
    header = _recv_exactly(sock, 4)
    if header is None:
        return None
    return _recv_exactly(sock, frame_length(header))


def _error_frame(exc: SignerError) -> bytes:
    kind = ERROR_UNAVAILABLE if isinstance(exc, SignerUnavailable) else ERROR_FAILED
    return encode_error(kind, str(exc))


def serve(spec: WorkerSpec, sock: socket.socket) -> None:
    """The worker process's main function: answer requests until EOF."""
    # Ctrl-C in a terminal reaches the whole process group; the parent decides
    # when workers stop, by closing their sockets.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with sock:
        try:
            session, signer = load_signer(spec)
        except SignerError as exc:
            sock.sendall(_error_frame(exc))
            return
        spki = signer.public_key.public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        try:
            sock.sendall(frame(TAG_READY, spki))
            _answer(sock, signer)
        except OSError:
            pass  # the parent went away
        finally:
            with contextlib.suppress(p11.PKCS11Error):  # the session may be gone
                session.close()


def _answer(sock: socket.socket, signer: KeySigner) -> None:
    while (body := _recv_frame(sock)) is not None:
        if body[0] != TAG_SIGN:
            raise ProtocolError(f"unexpected frame tag {body[0]}")
        try:
            signatures = signer.sign(decode_items(body[1:]))
        except SignerError as exc:
            sock.sendall(_error_frame(exc))
            if isinstance(exc, SignerUnavailable):
                return
            continue
        sock.sendall(frame(TAG_RESULT, encode_items(signatures)))
