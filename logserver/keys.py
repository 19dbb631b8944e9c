"""The log's keys: built from configuration and published for verifiers."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from logserver.config import Config, ConfigError, KeyConfig
from signer.keys import ArtifactSigner, CheckpointSigner, public_key_pem
from signer.software import SoftwareArtifactSigner, SoftwareCheckpointSigner
from verifier.note import verifier_key

logger = logging.getLogger(__name__)


@dataclass
class LogKeys:
    checkpoint: CheckpointSigner
    artifact: dict[str, ArtifactSigner]
    default_artifact: str

    @property
    def verifier_key(self) -> str:
        return verifier_key(self.checkpoint.name, self.checkpoint.public_key)

    async def aclose(self) -> None:
        for signer in self.artifact.values():
            await signer.aclose()
        await self.checkpoint.aclose()


def _secrets_dir(config: Config) -> Path:
    path = config.data / "secrets"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _artifact_signer(config: Config, name: str, key: KeyConfig) -> ArtifactSigner:
    if key.backend == "software":
        path = _secrets_dir(config) / f"artifact-{name}.pem"
        return SoftwareArtifactSigner.load_or_create(name, path, key.algorithm)
    from logserver.hsm import pkcs11_artifact_signer

    return pkcs11_artifact_signer(name, key)


def _checkpoint_signer(config: Config, origin: str) -> CheckpointSigner:
    key = config.checkpoint_key
    if key.backend == "software":
        path = _secrets_dir(config) / "checkpoint.pem"
        return SoftwareCheckpointSigner.load_or_create(origin, path)
    from logserver.hsm import pkcs11_checkpoint_signer

    return pkcs11_checkpoint_signer(origin, key)


def open_keys(config: Config, origin: str) -> LogKeys:
    """Every configured key, opened; warns once if any key is in software."""
    software = [
        name for name, k in config.artifact_keys.items() if k.backend == "software"
    ]
    if config.checkpoint_key.backend == "software":
        software.append("checkpoint")
    if software:
        logger.warning(
            "software keys are for development only: use an HSM in production",
            extra={"keys": ",".join(software), "secrets": str(config.data / "secrets")},
        )
    try:
        artifact = {
            name: _artifact_signer(config, name, key)
            for name, key in config.artifact_keys.items()
        }
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return LogKeys(
        _checkpoint_signer(config, origin), artifact, config.default_artifact_key
    )


def publish_keys(keys: LogKeys, directory: Path) -> None:
    """Write `log.vkey` and one `<name>.pem` per artifact key, atomically each."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"log.vkey": (keys.verifier_key + "\n").encode()}
    for name, signer in keys.artifact.items():
        files[f"{name}.pem"] = public_key_pem(signer.public_key)
    for filename, content in files.items():
        tmp = directory / f".{filename}.tmp"
        tmp.write_bytes(content)
        os.replace(tmp, directory / filename)
