"""PKCS#11 plumbing shared by the signing workers and key administration.

Everything here runs PKCS#11 calls on the caller's thread and keeps no state.
python-pkcs11 initialises the library without locking callbacks, so a process
must use it from one thread at a time: the log server never calls these
functions itself, its signing worker processes do (see `signer.pkcs11_worker`).

Tokens are found by label, never by slot number (SoftHSM renumbers slots when
a token is initialised). Errors come out as `SignerError`, or as
`SignerUnavailable` when the token or session is gone and a later attempt may
succeed. No message ever contains a PIN.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pkcs11
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11

from signer.keys import (
    ECDSA_P256_SHA256,
    ECDSA_P384_SHA256,
    RSA_PKCS1V15_SHA256,
    RSA_PSS_SHA256,
    SignerError,
    SignerUnavailable,
)

DEFAULT_PIN_ENV = "SIGNER_PKCS11_PIN"

# The checkpoint (signed note) key algorithm; artifact algorithms are in keys.py.
ED25519 = "ed25519"
KEY_ALGORITHMS = (
    ECDSA_P256_SHA256,
    ECDSA_P384_SHA256,
    RSA_PKCS1V15_SHA256,
    RSA_PSS_SHA256,
    ED25519,
)

# Tries at finding the token and logging in; the waits between them add up
# to about 2.5 s.
_OPEN_ATTEMPTS = 7

RSA_KEY_BITS = 3072
RSA_MIN_BITS = 2048

# DER of the named-curve OIDs as CKA_EC_PARAMS holds them. Ed25519 may also be
# named by the PrintableString "edwards25519" (PKCS#11 3.0, section 2.3.10).
P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # 1.2.840.10045.3.1.7
P384_PARAMS = bytes.fromhex("06052b81040022")  # 1.3.132.0.34
ED25519_PARAMS = bytes.fromhex("06032b6570")  # 1.3.101.112
ED25519_PARAMS_NAME = b"\x13\x0cedwards25519"

_CURVES: dict[bytes, ec.EllipticCurve] = {
    P256_PARAMS: ec.SECP256R1(),
    P384_PARAMS: ec.SECP384R1(),
}

# Errors after which the session, the login or the token itself is gone: the
# worker that saw one is replaced and the caller is asked to retry later.
_UNAVAILABLE: tuple[type[p11.PKCS11Error], ...] = (
    p11.DeviceError,
    p11.DeviceMemory,
    p11.DeviceRemoved,
    p11.FunctionFailed,
    p11.GeneralError,
    p11.HostMemory,
    # SoftHSM answers these on a session whose token went away, even after
    # it is back: only a new session recovers.
    p11.KeyHandleInvalid,
    p11.ObjectHandleInvalid,
    p11.NoSuchToken,
    p11.SessionClosed,
    p11.SessionCount,
    p11.SessionHandleInvalid,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.UserNotLoggedIn,
)

_PIN_ERRORS: dict[type[p11.PKCS11Error], str] = {
    p11.PinIncorrect: "PIN incorrect",
    p11.PinInvalid: "PIN has invalid characters",
    p11.PinLenRange: "PIN has the wrong length",
    p11.PinLocked: "PIN locked",
    p11.PinExpired: "PIN expired",
    p11.UserPinNotInitialized: "user PIN not initialised",
}


def translate(exc: p11.PKCS11Error, doing: str) -> SignerError:
    """A `SignerError` (or `SignerUnavailable`) saying what failed and why.

    python-pkcs11 names the PKCS#11 return value by the exception class and
    mostly leaves the message empty, so the class name is the diagnosis.
    """
    detail = type(exc).__name__
    if str(exc):
        detail = f"{detail}: {exc}"
    kind = SignerUnavailable if isinstance(exc, _UNAVAILABLE) else SignerError
    return kind(f"{doing}: {detail}")


def read_pin(pin_env: str | None, pin_file: Path | str | None) -> str:
    """The user PIN from a file (one line) or else from an environment variable.

    The variable defaults to `SIGNER_PKCS11_PIN`. Errors name the source, never
    the value.
    """
    if pin_file is not None:
        try:
            text = Path(pin_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise SignerError(f"cannot read the PIN file {pin_file}: {exc}") from exc
        except UnicodeDecodeError:
            # Not chained: the decode error quotes the offending byte.
            raise SignerError(f"the PIN file {pin_file} is not UTF-8") from None
        lines = text.splitlines()
        pin = lines[0] if lines else ""
        if not pin:
            raise SignerError(f"the PIN file {pin_file} is empty")
        return pin
    variable = pin_env or DEFAULT_PIN_ENV
    pin = os.environ.get(variable, "")
    if not pin:
        raise SignerError(f"the PIN environment variable {variable} is not set")
    return pin


def open_token(module: str, token_label: str) -> pkcs11.Token:
    """Load the PKCS#11 module and find the one token with this label."""
    try:
        lib = pkcs11.lib(module)
    except p11.PKCS11Error as exc:
        raise translate(exc, f"cannot load the PKCS#11 module {module}") from exc
    try:
        return lib.get_token(token_label=token_label)
    except p11.NoSuchToken as exc:
        raise SignerUnavailable(
            f"no token labelled {token_label!r} in {module}"
        ) from exc
    except p11.MultipleTokensReturned as exc:
        raise SignerError(
            f"more than one token labelled {token_label!r} in {module}"
        ) from exc
    except p11.PKCS11Error as exc:
        raise translate(exc, f"cannot list the tokens of {module}") from exc


def login(token: pkcs11.Token, pin: str, *, rw: bool = False) -> pkcs11.Session:
    """Open a session and log the user in.

    Login is per process: every session the process opens afterwards is logged
    in, and closing this one logs all of them out.
    """
    try:
        return token.open(rw=rw, user_pin=pin)
    except tuple(_PIN_ERRORS) as exc:
        reason = next(r for t, r in _PIN_ERRORS.items() if isinstance(exc, t))
        raise SignerError(f"login to token {token.label!r} refused: {reason}") from exc
    except p11.UserAlreadyLoggedIn as exc:
        raise SignerError(
            f"this process is already logged in to token {token.label!r}; "
            "PKCS#11 allows one login per process"
        ) from exc
    except p11.PKCS11Error as exc:
        raise translate(exc, f"cannot log in to token {token.label!r}") from exc


def open_session(
    module: str, token_label: str, pin: str | None, *, rw: bool = False
) -> pkcs11.Session:
    """Find the token and open a session, logged in if `pin` is given.

    SoftHSM rewrites its token file at every login, and another process
    reading it meanwhile finds no token or gets CKR_GENERAL_ERROR (about one
    attempt in three when three processes log in in a loop). Such answers
    are retried a few times, after re-initialising the module so that a
    half-open session goes away; call this before any other session is open.
    """
    for attempt in range(1, _OPEN_ATTEMPTS + 1):
        try:
            token = open_token(module, token_label)
            if pin is None:
                try:
                    return token.open(rw=rw)
                except p11.PKCS11Error as exc:
                    raise translate(exc, f"cannot open token {token_label!r}") from exc
            return login(token, pin, rw=rw)
        except SignerUnavailable:
            if attempt == _OPEN_ATTEMPTS:
                raise
        time.sleep(random.uniform(0.5, 1.5) * 0.02 * 2**attempt)
        try:
            pkcs11.lib(module).reinitialize()
        except p11.PKCS11Error as exc:
            raise translate(exc, f"cannot re-initialise {module}") from exc
    raise AssertionError("unreachable")


def find_key_pair(
    session: pkcs11.Session, label: str
) -> tuple[pkcs11.SignMixin, pkcs11.PublicKey]:
    """The private (signing) and public key objects that carry `label`."""
    token = session.token.label
    found = []
    for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        try:
            found.append(session.get_key(object_class=object_class, label=label))
        except p11.NoSuchKey as exc:
            kind = "private" if object_class == ObjectClass.PRIVATE_KEY else "public"
            raise SignerError(
                f"token {token!r} has no {kind} key labelled {label!r}"
            ) from exc
        except p11.MultipleObjectsReturned as exc:
            raise SignerError(
                f"token {token!r} has more than one key labelled {label!r}"
            ) from exc
        except p11.PKCS11Error as exc:
            raise translate(exc, f"cannot find key {label!r}") from exc
    private, public = found
    assert isinstance(private, pkcs11.PrivateKey)
    assert isinstance(private, pkcs11.SignMixin)
    assert isinstance(public, pkcs11.PublicKey)
    return private, public


def unwrap_octet_string(der: bytes, size: int) -> bytes:
    """The `size` content bytes of a DER OCTET STRING, or `der` if already raw.

    CKA_EC_POINT is specified as a DER OCTET STRING, but some modules return
    the bare point; the lengths tell the two apart.
    """
    if len(der) == size:
        return der
    if size < 0x80 and len(der) == size + 2 and der[:2] == bytes([0x04, size]):
        return der[2:]
    if (
        0x80 <= size < 0x100
        and len(der) == size + 3
        and der[:3] == bytes([0x04, 0x81, size])
    ):
        return der[3:]
    raise SignerError(f"malformed EC point ({len(der)} bytes, expected {size})")


def public_key_of(public: pkcs11.PublicKey) -> PublicKeyTypes:
    """The `cryptography` public key of a PKCS#11 public key object."""
    try:
        key_type = public.key_type
        if key_type == KeyType.RSA:
            modulus = int.from_bytes(public[Attribute.MODULUS], "big")
            exponent = int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big")
            return rsa.RSAPublicNumbers(exponent, modulus).public_key()
        if key_type == KeyType.EC:
            curve = _CURVES.get(bytes(public[Attribute.EC_PARAMS]))
            if curve is None:
                raise SignerError("unsupported EC curve (only P-256 and P-384)")
            size = 1 + 2 * ((curve.key_size + 7) // 8)
            point = unwrap_octet_string(bytes(public[Attribute.EC_POINT]), size)
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        if key_type == KeyType.EC_EDWARDS:
            params = bytes(public[Attribute.EC_PARAMS])
            if params not in (ED25519_PARAMS, ED25519_PARAMS_NAME):
                raise SignerError("unsupported Edwards curve (only Ed25519)")
            raw = unwrap_octet_string(bytes(public[Attribute.EC_POINT]), 32)
            return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except p11.PKCS11Error as exc:
        raise translate(exc, "cannot read the public key") from exc
    except ValueError as exc:
        raise SignerError(f"malformed public key: {exc}") from exc
    raise SignerError(f"unsupported key type {key_type!r}")


def describe_key(public_key: PublicKeyTypes) -> str:
    """A short name of the key's type and size: `ecdsa-p256`, `rsa-3072`, ..."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"ecdsa-p{public_key.curve.key_size}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa-{public_key.key_size}"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return ED25519
    return type(public_key).__name__


def check_key_fits(algorithm: str, public_key: PublicKeyTypes) -> None:
    """Raise `SignerError` unless the key can sign with `algorithm`."""
    fits = {
        ECDSA_P256_SHA256: isinstance(public_key, ec.EllipticCurvePublicKey)
        and public_key.curve.name == "secp256r1",
        ECDSA_P384_SHA256: isinstance(public_key, ec.EllipticCurvePublicKey)
        and public_key.curve.name == "secp384r1",
        RSA_PKCS1V15_SHA256: isinstance(public_key, rsa.RSAPublicKey)
        and public_key.key_size >= RSA_MIN_BITS,
        RSA_PSS_SHA256: isinstance(public_key, rsa.RSAPublicKey)
        and public_key.key_size >= RSA_MIN_BITS,
        ED25519: isinstance(public_key, ed25519.Ed25519PublicKey),
    }
    if algorithm not in fits:
        raise SignerError(f"unknown signing algorithm {algorithm!r}")
    if not fits[algorithm]:
        raise SignerError(
            f"a {describe_key(public_key)} key cannot sign with {algorithm}"
        )
