"""TLS served directly: `logserver serve --tls-cert FILE --tls-key FILE`.

A throw-away CA signs a certificate for 127.0.0.1. The server then answers
HTTPS only; clients that trust the CA sign and read, `verifier audit` checks
the whole log over HTTPS, and clients that do not trust it, or that speak
plain HTTP, get nothing; the server offers nothing below TLS 1.2. Broken
TLS settings stop the server before it starts, with exit status 2.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from logserver.cli import tls_context
from logserver.config import load_config
from tests.faults import request_body
from tests.serverproc import ServerProcess, free_port

ORIGIN = "tls.example/log"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ca.pem, and cert.pem/key.pem for 127.0.0.1 and localhost, signed by it."""
    root = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("logsign test CA"))
        .issuer_name(_name("logsign test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: root / f"{name}.pem" for name in ("ca", "cert", "key", "enc")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkcs8 = serialization.PrivateFormat.PKCS8
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()
        )
    )
    paths["enc"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            pkcs8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return paths


def _client(pki: dict[str, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki["ca"]))


def test_https_end_to_end(pki: dict[str, Path], tmp_path: Path) -> None:
    tls = _client(pki)
    server = ServerProcess(
        tmp_path / "data",
        "--origin", ORIGIN,
        "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
        tls=tls,
    )  # fmt: skip
    try:
        assert f"https://127.0.0.1:{server.port}/" in server.log.read_text()
        for n in range(3):
            status, answer = server.post("api/v1/entries", request_body("tls", n))
            assert status == 201, answer
        assert server.get("checkpoint").startswith(ORIGIN.encode())

        # verifier audit over HTTPS, trusting the test CA through the
        # standard SSL_CERT_FILE variable (as a private CA would be).
        vkey = (server.data / "public" / "log.vkey").read_text().strip()
        audit = subprocess.run(
            [sys.executable, "-m", "verifier.cli", "audit",
             "--log", server.url, "--log-key", vkey],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "SSL_CERT_FILE": str(pki["ca"])},
        )  # fmt: skip
        assert audit.returncode == 0, audit.stdout + audit.stderr

        # A client that does not trust the certificate gets no answer.
        untrusting = ssl.create_default_context()
        conn = http.client.HTTPSConnection(
            "127.0.0.1", server.port, timeout=5, context=untrusting
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            conn.request("GET", "/checkpoint")
        conn.close()

        # Plain HTTP to the TLS port is no request at all.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /checkpoint HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            with contextlib.suppress(OSError):
                while data := sock.recv(4096):
                    got += data
        assert ORIGIN.encode() not in got

        assert server.proc.poll() is None
    finally:
        assert server.stop() == 0


def test_the_server_context_wants_tls_1_2_at_least(pki: dict[str, Path]) -> None:
    config = load_config(None, tls_cert=pki["cert"], tls_key=pki["key"])
    context = tls_context(config)
    assert context is not None
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls_context(load_config(None)) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "{cert}"], "give both tls_cert and tls_key"),
        (["--tls-key", "{key}"], "give both tls_cert and tls_key"),
        (["--tls-cert", "{cert}", "--tls-key", "{missing}"], "cannot load the TLS"),
        (["--tls-cert", "{key}", "--tls-key", "{key}"], "cannot load the TLS"),
        (["--tls-cert", "{cert}", "--tls-key", "{enc}"], "the TLS key is encrypted"),
    ],
)
def test_broken_tls_settings_stop_the_start(
    pki: dict[str, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    files = {name: str(path) for name, path in pki.items()}
    files["missing"] = str(tmp_path / "missing.pem")
    command = [
        sys.executable, "-m", "logserver.cli", "serve",
        "--data", str(tmp_path / "data"), "--listen", f"127.0.0.1:{free_port()}",
        *(a.format(**files) for a in args),
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "passphrase" not in result.stderr
