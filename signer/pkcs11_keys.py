"""Key administration in a PKCS#11 token: generate, list, export public keys.

These run in the calling process (the `signer key` commands), one call at a
time; the log server signs through worker processes instead. Keys are made
inside the token: the private half is sensitive and not extractable, so no
one, this program included, can read it out.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11

from signer import pkcs11_session as session_
from signer.keys import (
    ECDSA_P256_SHA256,
    ECDSA_P384_SHA256,
    SignerError,
    public_key_id,
    public_key_pem,
)
from signer.pkcs11_config import Pkcs11Config
from signer.pkcs11_session import ED25519
from verifier.note import verifier_key

_PUBLIC_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: False,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
}
_PRIVATE_TEMPLATE: dict[Attribute, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
_SIGN_ONLY = MechanismFlag.SIGN | MechanismFlag.VERIFY
_EC_PARAMS = {
    ECDSA_P256_SHA256: session_.P256_PARAMS,
    ECDSA_P384_SHA256: session_.P384_PARAMS,
}


@dataclass(frozen=True)
class KeyInfo:
    """A key pair in a token, as `signer key list` shows it."""

    label: str
    kind: str  # "ecdsa-p256", "rsa-3072", "ed25519", or the PKCS#11 key type
    ck_id: str  # hex CKA_ID, which other PKCS#11 tools pair objects by
    key_id: str | None  # public_key_id(); None when the type is unsupported
    has_private: bool
    sensitive: bool | None  # of the private key; None without one
    extractable: bool | None
    public_key: PublicKeyTypes | None = field(default=None, repr=False)


def _generate(
    session: pkcs11.Session, algorithm: str, label: str
) -> tuple[pkcs11.PublicKey, pkcs11.PrivateKey]:
    common: dict[str, Any] = {
        "label": label,
        "store": True,
        "capabilities": _SIGN_ONLY,
        "private_template": _PRIVATE_TEMPLATE,
    }
    if algorithm in _EC_PARAMS:
        public_template = {
            **_PUBLIC_TEMPLATE,
            Attribute.EC_PARAMS: _EC_PARAMS[algorithm],
        }
        return session.generate_keypair(
            KeyType.EC, public_template=public_template, **common
        )
    if algorithm == ED25519:
        public_template = {
            **_PUBLIC_TEMPLATE,
            Attribute.EC_PARAMS: session_.ED25519_PARAMS,
        }
        return session.generate_keypair(
            KeyType.EC_EDWARDS,
            mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
            public_template=public_template,
            **common,
        )
    return session.generate_keypair(
        KeyType.RSA,
        session_.RSA_KEY_BITS,
        public_template=_PUBLIC_TEMPLATE,
        **common,
    )


def generate_key(config: Pkcs11Config, algorithm: str) -> KeyInfo:
    """Generate a key pair for `algorithm` in the token, labelled `key_label`.

    `algorithm` is one of `signer.keys.ARTIFACT_ALGORITHMS` or `"ed25519"` for
    a checkpoint key. RSA keys are 3072 bits. Refuses to reuse a label, and
    checks the token stored the private key as sensitive and not extractable.
    """
    if algorithm not in session_.KEY_ALGORITHMS:
        raise ValueError(f"unknown key algorithm {algorithm!r}")
    pin = config.read_pin()
    token = config.token_label
    label = config.key_label
    with session_.open_session(config.module, token, pin, rw=True) as session:
        if next(session.get_objects({Attribute.LABEL: label}), None) is not None:
            raise SignerError(
                f"token {token!r} already has an object labelled {label!r}"
            )
        try:
            public, private = _generate(session, algorithm, label)
        except p11.PKCS11Error as exc:
            raise session_.translate(exc, f"cannot generate a {algorithm} key") from exc
        try:
            return _finish(token, label, public, private)
        except SignerError:
            # Leave no half-made or weak key behind under a label in use.
            with contextlib.suppress(p11.PKCS11Error):
                private.destroy()
                public.destroy()
            raise


def _finish(
    token: str, label: str, public: pkcs11.PublicKey, private: pkcs11.PrivateKey
) -> KeyInfo:
    """Set CKA_ID and check what the token made of the new key pair."""
    public_key = session_.public_key_of(public)
    # CKA_ID pairs the two halves for other tools; derive it from the key so a
    # leaf's key ID leads back to the token objects.
    ck_id = hashlib.sha256(_spki(public_key)).digest()[:16]
    try:
        public[Attribute.ID] = ck_id
        private[Attribute.ID] = ck_id
    except p11.PKCS11Error as exc:
        raise session_.translate(exc, "cannot set the key's CKA_ID") from exc
    info = _describe(label, public, private)
    if info.sensitive is not True or info.extractable is not False:
        raise SignerError(
            f"token {token!r} did not keep key {label!r} sensitive and unextractable"
        )
    return info


def list_keys(module: str, token: str, pin: str | None) -> list[KeyInfo]:
    """Every key pair in the token, by label; private keys need the PIN."""
    with session_.open_session(module, token, pin) as session:
        try:
            publics = _by_label(session, ObjectClass.PUBLIC_KEY)
            privates = _by_label(session, ObjectClass.PRIVATE_KEY)
        except p11.PKCS11Error as exc:
            raise session_.translate(exc, f"cannot list the keys of {token!r}") from exc
        return [
            _describe(label, publics.get(label), privates.get(label))
            for label in sorted(publics.keys() | privates.keys())
        ]


def export_public_pem(module: str, token: str, label: str, pin: str | None) -> bytes:
    """The SubjectPublicKeyInfo PEM of the key labelled `label`."""
    return public_key_pem(_public_key(module, token, label, pin))


def export_verifier_key(
    module: str, token: str, label: str, name: str, pin: str | None
) -> str:
    """The signed-note verifier key `<name>+<key ID>+<key>` of an Ed25519 key."""
    public_key = _public_key(module, token, label, pin)
    if not isinstance(public_key, ed25519.Ed25519PublicKey):
        kind = session_.describe_key(public_key)
        raise SignerError(f"key {label!r} is {kind}; note keys are Ed25519")
    raw = public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return verifier_key(name, raw)


def _public_key(module: str, token: str, label: str, pin: str | None) -> PublicKeyTypes:
    with session_.open_session(module, token, pin) as session:
        try:
            public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
        except p11.NoSuchKey as exc:
            raise SignerError(f"token {token!r} has no public key {label!r}") from exc
        except p11.MultipleObjectsReturned as exc:
            raise SignerError(
                f"token {token!r} has more than one public key {label!r}"
            ) from exc
        except p11.PKCS11Error as exc:
            raise session_.translate(exc, f"cannot find key {label!r}") from exc
        assert isinstance(public, pkcs11.PublicKey)
        return session_.public_key_of(public)


def _by_label(session: pkcs11.Session, object_class: ObjectClass) -> dict[str, Any]:
    objects: dict[str, Any] = {}
    for obj in session.get_objects({Attribute.CLASS: object_class}):
        objects.setdefault(obj[Attribute.LABEL], obj)
    return objects


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _describe(
    label: str, public: pkcs11.PublicKey | None, private: pkcs11.PrivateKey | None
) -> KeyInfo:
    public_key: PublicKeyTypes | None = None
    kind = "no public key"
    if public is not None:
        try:
            public_key = session_.public_key_of(public)
            kind = session_.describe_key(public_key)
        except SignerError:
            kind = f"{public.key_type.name.lower()} (unsupported)"
    holder = public if public is not None else private
    ck_id = b"" if holder is None else bytes(holder[Attribute.ID])
    sensitive = extractable = None
    if private is not None:
        sensitive = bool(private[Attribute.SENSITIVE])
        extractable = bool(private[Attribute.EXTRACTABLE])
    return KeyInfo(
        label=label,
        kind=kind,
        ck_id=ck_id.hex(),
        key_id=None if public_key is None else public_key_id(public_key),
        has_private=private is not None,
        sensitive=sensitive,
        extractable=extractable,
        public_key=public_key,
    )
