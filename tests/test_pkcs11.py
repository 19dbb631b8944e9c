"""PKCS#11 signing against a real SoftHSM2 token.

One token per module holds a key of each algorithm (RSA key generation is
slow, so each RSA key is made once). Signers run their worker processes for
real; the fault tests kill and stop them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
)
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from softhsm import SoftHsmStore, SoftHsmToken

from signer import cli
from signer.keys import (
    ARTIFACT_ALGORITHMS,
    ECDSA_P256_SHA256,
    ECDSA_P384_SHA256,
    RSA_PKCS1V15_SHA256,
    RSA_PSS_SHA256,
    ArtifactSigner,
    CheckpointSigner,
    SignerError,
    SignerUnavailable,
)
from signer.pkcs11_backend import (
    ED25519,
    Pkcs11ArtifactSigner,
    Pkcs11CheckpointSigner,
    Pkcs11Config,
    export_public_pem,
    export_verifier_key,
    generate_key,
    list_keys,
)
from signer.pkcs11_session import read_pin, unwrap_octet_string
from signer.pkcs11_worker import KeySigner, ecdsa_der, verify_signature
from verifier.note import verifier_key

PIN_ENV = "TEST_PKCS11_PIN"
ORIGIN = "test.example/log"
WRONG_PIN = "9-wrong-pin-0417"
LABELS = {
    ECDSA_P256_SHA256: "artifact-p256",
    ECDSA_P384_SHA256: "artifact-p384",
    RSA_PKCS1V15_SHA256: "artifact-rsa-pkcs1",
    RSA_PSS_SHA256: "artifact-rsa-pss",
    ED25519: "checkpoint",
}
PREHASHED = Prehashed(hashes.SHA256())


@dataclass(frozen=True)
class Hsm:
    token: SoftHsmToken
    locked: SoftHsmToken  # a second token, for logins with a wrong PIN

    def config(self, algorithm: str, **overrides: object) -> Pkcs11Config:
        fields: dict[str, object] = {
            "module": self.token.module,
            "token_label": self.token.label,
            "key_label": LABELS[algorithm],
            "pin_env": PIN_ENV,
            **overrides,
        }
        return Pkcs11Config.model_validate(fields)


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hsm]:
    """A token with one key of every algorithm; the PIN in $TEST_PKCS11_PIN."""
    with SoftHsmStore(tmp_path_factory.mktemp("softhsm")) as store:
        token = store.create_token("logsign-test")
        locked = store.create_token("logsign-wrong-pin")
        with pytest.MonkeyPatch.context() as env:
            env.setenv(PIN_ENV, token.pin)
            hsm = Hsm(token, locked)
            for algorithm in LABELS:
                generate_key(hsm.config(algorithm), algorithm)
            yield hsm


def digests(count: int, salt: bytes = b"") -> list[bytes]:
    return [hashlib.sha256(salt + i.to_bytes(4, "big")).digest() for i in range(count)]


def verify(algorithm: str, key: PublicKeyTypes, digest: bytes, sig: bytes) -> None:
    if algorithm in (ECDSA_P256_SHA256, ECDSA_P384_SHA256):
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(sig, digest, ec.ECDSA(PREHASHED))
    elif algorithm == RSA_PKCS1V15_SHA256:
        assert isinstance(key, rsa.RSAPublicKey)
        key.verify(sig, digest, padding.PKCS1v15(), PREHASHED)
    else:
        assert isinstance(key, rsa.RSAPublicKey)
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        key.verify(sig, digest, pss, PREHASHED)


def openssl_verify(algorithm: str, pem: bytes, sig: bytes, tmp: Path) -> None:
    """`openssl dgst -sha256 -verify` over the real file, as consumers run it."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    artifact = tmp / "artifact.bin"
    (tmp / "key.pem").write_bytes(pem)
    (tmp / "artifact.sig").write_bytes(sig)
    command = ["openssl", "dgst", "-sha256", "-verify", str(tmp / "key.pem")]
    if algorithm == RSA_PSS_SHA256:
        command += ["-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32"]
    command += ["-signature", str(tmp / "artifact.sig"), str(artifact)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verified OK" in result.stdout


# Pure parts: no token needed.


@given(
    r=st.integers(min_value=1, max_value=2**256 - 1),
    s=st.integers(min_value=1, max_value=2**256 - 1),
)
def test_raw_ecdsa_signature_becomes_der(r: int, s: int) -> None:
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert decode_dss_signature(ecdsa_der(raw, ec.SECP256R1())) == (r, s)


def test_raw_ecdsa_signature_of_wrong_length_is_refused() -> None:
    with pytest.raises(SignerError, match="expected 64"):
        ecdsa_der(bytes(63), ec.SECP256R1())


def test_ec_point_unwraps_from_octet_string() -> None:
    point = bytes([4]) + bytes(range(64))
    assert unwrap_octet_string(bytes([0x04, 65]) + point, 65) == point
    assert unwrap_octet_string(point, 65) == point
    ed_point = bytes(range(32))
    assert unwrap_octet_string(b"\x04\x20" + ed_point, 32) == ed_point
    for bad in (b"\x04\x21" + ed_point, b"\x03\x20" + ed_point, ed_point[:31]):
        with pytest.raises(SignerError):
            unwrap_octet_string(bad, 32)


class _FaultyKey:
    """Stands in for a PKCS#11 private key that returns a wrong signature."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def sign(self, data: bytes, **_: object) -> bytes:
        r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(PREHASHED)))
        return r.to_bytes(32, "big") + (s ^ 1).to_bytes(32, "big")


def test_signature_that_does_not_verify_is_withheld() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = KeySigner(ECDSA_P256_SHA256, _FaultyKey(key), key.public_key())  # type: ignore[arg-type]
    with pytest.raises(SignerError, match="does not verify"):
        signer.sign(digests(3))


def test_verify_signature_checks_each_algorithm() -> None:
    digest = digests(1)[0]
    ed = ed25519.Ed25519PrivateKey.generate()
    verify_signature(ED25519, ed.public_key(), b"note\n", ed.sign(b"note\n"))
    with pytest.raises(SignerError):
        verify_signature(ED25519, ed.public_key(), b"note\n", bytes(64))
    rsa_key = rsa.generate_private_key(65537, 2048)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    good = rsa_key.sign(digest, pss, PREHASHED)
    verify_signature(RSA_PSS_SHA256, rsa_key.public_key(), digest, good)
    with pytest.raises(SignerError):  # a PSS signature is no PKCS#1 v1.5 one
        verify_signature(RSA_PKCS1V15_SHA256, rsa_key.public_key(), digest, good)


def test_pin_comes_from_file_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("s3cret-file-pin\n")
    assert read_pin(None, pin_file) == "s3cret-file-pin"
    monkeypatch.setenv("SIGNER_PKCS11_PIN", "s3cret-env-pin")
    assert read_pin(None, None) == "s3cret-env-pin"
    monkeypatch.delenv("SIGNER_PKCS11_PIN")
    with pytest.raises(SignerError, match="SIGNER_PKCS11_PIN is not set"):
        read_pin(None, None)
    with pytest.raises(SignerError, match="cannot read the PIN file"):
        read_pin(None, tmp_path / "missing")
    pin_file.write_bytes(b"s3cret-\xff-pin")
    with pytest.raises(SignerError, match="is not UTF-8") as raised:
        read_pin(None, pin_file)
    assert raised.value.__cause__ is None and "xff" not in str(raised.value)
    with pytest.raises(ValidationError, match="not both"):
        Pkcs11Config(
            module="m", token_label="t", key_label="k", pin_env="X", pin_file=pin_file
        )


def test_config_never_holds_the_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_PIN_VAR", "s3cret-env-pin")
    config = Pkcs11Config(
        module="m", token_label="t", key_label="k", pin_env="SOME_PIN_VAR"
    )
    assert config.read_pin() == "s3cret-env-pin"
    for text in (repr(config), str(config), config.model_dump_json()):
        assert "s3cret" not in text
    assert config.workers == 2


# Key generation and administration.


@pytest.mark.hsm
@pytest.mark.parametrize("algorithm", list(LABELS))
def test_generated_private_keys_cannot_leave_the_token(
    hsm: Hsm, algorithm: str
) -> None:
    token = pkcs11.lib(hsm.token.module).get_token(token_label=hsm.token.label)
    with token.open(user_pin=hsm.token.pin) as session:
        private = session.get_key(
            object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=LABELS[algorithm]
        )
        assert private[pkcs11.Attribute.SENSITIVE] is True
        assert private[pkcs11.Attribute.EXTRACTABLE] is False
        assert private[pkcs11.Attribute.NEVER_EXTRACTABLE] is True
        assert private[pkcs11.Attribute.TOKEN] is True
        secret = (
            pkcs11.Attribute.PRIVATE_EXPONENT
            if algorithm in (RSA_PKCS1V15_SHA256, RSA_PSS_SHA256)
            else pkcs11.Attribute.VALUE
        )
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            private[secret]


@pytest.mark.hsm
def test_list_keys_shows_every_key(hsm: Hsm) -> None:
    keys = {
        info.label: info
        for info in list_keys(hsm.token.module, hsm.token.label, hsm.token.pin)
    }
    assert set(LABELS.values()) <= set(keys)
    kinds = {
        ECDSA_P256_SHA256: "ecdsa-p256",
        ECDSA_P384_SHA256: "ecdsa-p384",
        RSA_PKCS1V15_SHA256: "rsa-3072",
        RSA_PSS_SHA256: "rsa-3072",
        ED25519: "ed25519",
    }
    for algorithm, label in LABELS.items():
        info = keys[label]
        assert info.kind == kinds[algorithm]
        assert info.has_private and info.sensitive and not info.extractable
        assert info.key_id is not None and len(info.key_id) == 64
        assert info.ck_id == info.key_id[:32]


@pytest.mark.hsm
def test_generate_refuses_a_label_in_use(hsm: Hsm) -> None:
    with pytest.raises(SignerError, match="already has an object labelled"):
        generate_key(hsm.config(ECDSA_P256_SHA256), ECDSA_P256_SHA256)


# Artifact signing through the worker processes.


@pytest.mark.hsm
@pytest.mark.parametrize("algorithm", ARTIFACT_ALGORITHMS)
async def test_artifact_signatures_verify(
    hsm: Hsm, algorithm: str, tmp_path: Path
) -> None:
    # SoftHSM signs P-256 fast, P-384 and RSA-3072 an order of magnitude slower.
    fast = algorithm == ECDSA_P256_SHA256
    tasks, per_task, batch = (200, 3, 1000) if fast else (10, 2, 24)
    config = hsm.config(algorithm, workers=2)
    async with await Pkcs11ArtifactSigner.open("release", config, algorithm) as signer:
        assert isinstance(signer, ArtifactSigner)
        assert signer.algorithm == algorithm
        assert len(signer.worker_pids) == 2
        pem = export_public_pem(
            hsm.token.module, hsm.token.label, LABELS[algorithm], None
        )
        assert pem == signer.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

        # Many concurrent callers, and one batch that spans both workers.
        calls = [digests(per_task, salt=bytes([i])) for i in range(tasks)]
        calls.append(digests(batch, salt=b"batch"))
        results = await asyncio.gather(*(signer.sign_digests(c) for c in calls))
        for call, signatures in zip(calls, results, strict=True):
            assert len(signatures) == len(call)
            for digest, signature in zip(call, signatures, strict=True):
                verify(algorithm, signer.public_key, digest, signature)

        artifact = os.urandom(100_000)
        (tmp_path / "artifact.bin").write_bytes(artifact)
        (signature,) = await signer.sign_digests([hashlib.sha256(artifact).digest()])
        openssl_verify(algorithm, pem, signature, tmp_path)


@pytest.mark.hsm
async def test_event_loop_keeps_running_while_signing(hsm: Hsm) -> None:
    config = hsm.config(ECDSA_P256_SHA256)
    async with await Pkcs11ArtifactSigner.open("release", config) as signer:
        worst = 0.0

        async def ticker() -> None:
            nonlocal worst
            while True:
                before = time.perf_counter()
                await asyncio.sleep(0.005)
                worst = max(worst, time.perf_counter() - before)

        ticking = asyncio.create_task(ticker())
        started = time.perf_counter()
        await signer.sign_digests(digests(3000))
        elapsed = time.perf_counter() - started
        ticking.cancel()
    # Signing on the loop would stall the ticker for the whole batch.
    assert worst < max(0.25, elapsed / 3), (worst, elapsed)


@pytest.mark.hsm
async def test_checkpoint_signatures_verify(hsm: Hsm) -> None:
    config = hsm.config(ED25519, workers=2)
    async with await Pkcs11CheckpointSigner.open(ORIGIN, config) as signer:
        assert isinstance(signer, CheckpointSigner)
        assert len(signer.public_key) == 32
        vkey = export_verifier_key(
            hsm.token.module, hsm.token.label, LABELS[ED25519], ORIGIN, None
        )
        assert vkey == verifier_key(ORIGIN, signer.public_key) == signer.verifier_key
        messages = [f"{ORIGIN}\n{n}\nroot-{n}\n".encode() for n in range(200)]
        signatures = await asyncio.gather(*(signer.sign(m) for m in messages))
        public = ed25519.Ed25519PublicKey.from_public_bytes(signer.public_key)
        for message, signature in zip(messages, signatures, strict=True):
            assert len(signature) == 64
            public.verify(signature, message)


# Failures: they raise SignerError or SignerUnavailable, never hang or crash.


async def _recovered(signer: Pkcs11ArtifactSigner, workers: int) -> list[bytes]:
    """Sign until every worker is back; the recovery takes a back-off or two."""
    deadline = time.monotonic() + 20
    while True:
        try:
            signatures = await signer.sign_digests(digests(8))
            if len(signer.worker_pids) == workers:
                return signatures
        except SignerUnavailable:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


@pytest.mark.hsm
async def test_killed_worker_gives_unavailable_then_recovers(hsm: Hsm) -> None:
    config = hsm.config(ECDSA_P256_SHA256, workers=2, timeout=5)
    async with await Pkcs11ArtifactSigner.open("release", config) as signer:
        before = signer.worker_pids
        calls = [
            asyncio.create_task(signer.sign_digests(digests(50, salt=bytes([i]))))
            for i in range(40)
        ]
        await asyncio.sleep(0.05)  # let the workers get busy
        os.kill(before[0], signal.SIGKILL)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*calls, return_exceptions=True), timeout=10
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        assert failures, "a call in flight on the killed worker must fail"
        assert all(isinstance(f, SignerUnavailable) for f in failures), failures
        for outcome in outcomes:
            if not isinstance(outcome, BaseException):
                assert len(outcome) == 50

        for digest, signature in zip(
            digests(8), await _recovered(signer, 2), strict=True
        ):
            verify(ECDSA_P256_SHA256, signer.public_key, digest, signature)
        assert before[0] not in signer.worker_pids

        # With every worker gone, calls fail fast until the restarts succeed.
        for pid in signer.worker_pids:
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(SignerUnavailable):
            for _ in range(20):
                await signer.sign_digests(digests(1))
        assert time.monotonic() - started < 5
        await _recovered(signer, 2)


@pytest.mark.hsm
async def test_stuck_worker_times_out_and_is_replaced(hsm: Hsm) -> None:
    config = hsm.config(ECDSA_P256_SHA256, workers=1, timeout=1)
    async with await Pkcs11ArtifactSigner.open("release", config) as signer:
        (pid,) = signer.worker_pids
        os.kill(pid, signal.SIGSTOP)  # as if the HSM never answered
        try:
            started = time.monotonic()
            with pytest.raises(SignerUnavailable, match="did not answer within 1 s"):
                await signer.sign_digests(digests(4))
            assert time.monotonic() - started < 3
        finally:
            os.kill(pid, signal.SIGCONT)
        await _recovered(signer, 1)
        assert signer.worker_pids != [pid]


@pytest.mark.hsm
async def test_wrong_pin_is_a_clear_error_without_the_pin(
    hsm: Hsm, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("WRONG_PIN_VAR", WRONG_PIN)
    config = hsm.config(
        ECDSA_P256_SHA256,
        token_label=hsm.locked.label,
        pin_env="WRONG_PIN_VAR",
        workers=1,
    )
    with pytest.raises(SignerError) as raised:
        await Pkcs11ArtifactSigner.open("release", config)
    assert not isinstance(raised.value, SignerUnavailable)  # retrying cannot help
    assert "PIN incorrect" in str(raised.value)
    assert hsm.locked.label in str(raised.value)

    texts = [str(raised.value), repr(raised.value), repr(config), caplog.text]
    texts += [repr(record.__dict__) for record in caplog.records]
    for text in texts:
        assert WRONG_PIN not in text
        assert hsm.token.pin not in text


@pytest.mark.hsm
async def test_pin_never_reaches_the_logs(
    hsm: Hsm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = hsm.config(ECDSA_P256_SHA256, workers=1)
    async with await Pkcs11ArtifactSigner.open("release", config) as signer:
        os.kill(signer.worker_pids[0], signal.SIGKILL)
        with pytest.raises(SignerUnavailable):
            for _ in range(50):
                await signer.sign_digests(digests(1))
                await asyncio.sleep(0.02)
        await _recovered(signer, 1)
    assert "HSM worker lost" in caplog.text
    for record in caplog.records:
        assert hsm.token.pin not in repr(record.__dict__)


@pytest.mark.hsm
@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"key_label": "no-such-key"}, SignerError, "no private key labelled"),
        ({"token_label": "no-such-token"}, SignerUnavailable, "no token labelled"),
        ({"pin_env": "UNSET_PIN_VAR"}, SignerError, "UNSET_PIN_VAR is not set"),
        ({"key_label": LABELS[ECDSA_P384_SHA256]}, SignerError, "cannot sign with"),
    ],
)
async def test_signer_does_not_start_on_bad_configuration(
    hsm: Hsm, overrides: dict[str, str], error: type[Exception], message: str
) -> None:
    config = hsm.config(ECDSA_P256_SHA256, workers=1, **overrides)
    with pytest.raises(error, match=message):
        await Pkcs11ArtifactSigner.open("release", config, ECDSA_P256_SHA256)


# The `signer key` commands.


def _token_args(hsm: Hsm) -> list[str]:
    return ["--module", hsm.token.module, "--token", hsm.token.label]


@pytest.mark.hsm
def test_cli_generate_list_and_export(
    hsm: Hsm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = _token_args(hsm)
    assert (
        cli.main(
            ["key", "generate", *token, "--label", "cli-p256", "--pin-env", PIN_ENV]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "algorithm: ecdsa-p256-sha256" in out
    key_id = out.split("key id:")[1].split()[0]

    pin_file = tmp_path / "pin"
    pin_file.write_text(hsm.token.pin + "\n")
    assert cli.main(["key", "list", *token, "--pin-file", str(pin_file)]) == 0
    listing = capsys.readouterr().out
    assert (
        f"cli-p256\tecdsa-p256\t{key_id}\tprivate: sensitive, not extractable"
        in listing
    )
    assert LABELS[ED25519] in listing

    pem_path = tmp_path / "cli-p256.pem"
    assert (
        cli.main(
            [
                "key",
                "export-pem",
                *token,
                "--label",
                "cli-p256",
                "--output",
                str(pem_path),
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().err
    public = serialization.load_pem_public_key(pem_path.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert cli.main(["key", "export-pem", *token, "--label", "cli-p256"]) == 0
    assert capsys.readouterr().out.encode() == pem_path.read_bytes()
    # Written atomically (no temporary file left), yet a device still works.
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".cli-p256.pem")]
    args = ["key", "export-pem", *token, "--label", "cli-p256", "--output"]
    assert cli.main([*args, os.devnull]) == 0
    capsys.readouterr()

    args = ["key", "export-vkey", *token, "--label", LABELS[ED25519], "--name", ORIGIN]
    assert cli.main(args) == 0
    vkey = capsys.readouterr().out.strip()
    assert vkey.startswith(ORIGIN + "+")
    assert vkey == export_verifier_key(
        hsm.token.module, hsm.token.label, LABELS[ED25519], ORIGIN, None
    )


@pytest.mark.hsm
def test_cli_generate_ed25519_as_json(
    hsm: Hsm, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["key", "generate", *_token_args(hsm), "--label", "cli-ed25519"]
    args += ["--algorithm", "ed25519", "--pin-env", PIN_ENV, "--json"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "ed25519"
    assert result["sensitive"] is True and result["extractable"] is False


@pytest.mark.hsm
def test_cli_failures_exit_1_with_a_diagnosis(
    hsm: Hsm, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    token = _token_args(hsm)
    label = LABELS[ECDSA_P256_SHA256]
    assert (
        cli.main(["key", "export-vkey", *token, "--label", label, "--name", ORIGIN])
        == 1
    )
    assert "note keys are Ed25519" in capsys.readouterr().err

    monkeypatch.setenv("WRONG_PIN_VAR", WRONG_PIN)
    locked = ["--module", hsm.locked.module, "--token", hsm.locked.label]
    assert cli.main(["key", "list", *locked, "--pin-env", "WRONG_PIN_VAR"]) == 1
    captured = capsys.readouterr()
    assert "PIN incorrect" in captured.err
    assert WRONG_PIN not in captured.err + captured.out

    assert (
        cli.main(["key", "generate", *token, "--label", label, "--pin-env", PIN_ENV])
        == 1
    )
    assert "already has an object" in capsys.readouterr().err


def test_cli_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("signer ")
    assert cli.main(["key", "generate", "--module", "m", "--label", "x"]) == 2
    assert "--token" in capsys.readouterr().err
    assert cli.main(["key", "list", "--module", "m", "--token", "t", "--pin", "1"]) == 2
    assert cli.main([]) == 2
    assert cli.main(["key", "--help"]) == 0
    assert "export-vkey" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert {"sign", "approve", "key"} <= set(capsys.readouterr().out.split())
