"""The log's keys: opened from configuration, recorded, and published.

Every artifact key the log has signed with is recorded in storage the first
time it is opened, so its public key stays published after it is retired or
removed from the configuration: old signatures remain verifiable.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from logserver.config import Config, KeyConfig
from logserver.storage import Storage
from signer.atomicfile import remove_stale_temporaries, write_atomic
from signer.keys import ArtifactSigner, CheckpointSigner, SignerError, public_key_pem
from signer.software import SoftwareArtifactSigner, SoftwareCheckpointSigner
from verifier.note import verifier_key

logger = logging.getLogger(__name__)

_REGISTRY_PREFIX = "artifact_key:"


@dataclass(frozen=True)
class PublishedKey:
    """An artifact public key as published: active, default or retired."""

    name: str
    algorithm: str
    key_id: str
    pem: str
    status: str

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "algorithm": self.algorithm,
            "key_id": self.key_id,
            "status": self.status,
            "public_key_pem": self.pem,
        }


@dataclass
class LogKeys:
    checkpoint: CheckpointSigner
    artifact: dict[str, ArtifactSigner]
    default_artifact: str
    published: list[PublishedKey]

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


async def _artifact_signer(config: Config, name: str, key: KeyConfig) -> ArtifactSigner:
    if key.pkcs11 is not None:
        from signer.pkcs11_backend import Pkcs11ArtifactSigner

        return await Pkcs11ArtifactSigner.open(name, key.pkcs11, key.algorithm)
    path = _secrets_dir(config) / f"artifact-{name}.pem"
    return SoftwareArtifactSigner.load_or_create(
        name, path, key.algorithm, processes=_signing_processes()
    )


def _signing_processes() -> int:
    """Worker processes for a software key's large batches: none on one CPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    cpus = cpus or os.cpu_count() or 1
    return 0 if cpus < 2 else min(cpus, 4)


async def _checkpoint_signer(config: Config, origin: str) -> CheckpointSigner:
    key = config.checkpoint_key
    if key.pkcs11 is not None:
        from signer.pkcs11_backend import Pkcs11CheckpointSigner

        return await Pkcs11CheckpointSigner.open(origin, key.pkcs11)
    path = _secrets_dir(config) / "checkpoint.pem"
    return SoftwareCheckpointSigner.load_or_create(origin, path)


async def open_keys(config: Config, origin: str, storage: Storage) -> LogKeys:
    """Open every active key, record it, and list all keys ever recorded."""
    for directory in (config.data / "secrets", config.data / "public"):
        for path in remove_stale_temporaries(directory):
            logger.warning(
                "removed a file left by an interrupted write",
                extra={"path": str(path)},
            )
    software = [
        name
        for name, k in config.artifact_keys.items()
        if k.backend == "software" and not k.retired
    ]
    if config.checkpoint_key.backend == "software":
        software.append("checkpoint")
    if software:
        logger.warning(
            "software keys are for development only: use an HSM in production",
            extra={"keys": ",".join(software), "secrets": str(config.data / "secrets")},
        )

    artifact: dict[str, ArtifactSigner] = {}
    checkpoint: CheckpointSigner | None = None
    try:
        for name, key in config.artifact_keys.items():
            if not key.retired:
                artifact[name] = await _artifact_signer(config, name, key)
        checkpoint = await _checkpoint_signer(config, origin)
        published = await _record_and_list(storage, artifact, config)
    except BaseException:
        for opened in artifact.values():
            await opened.aclose()
        if checkpoint is not None:
            await checkpoint.aclose()
        raise
    return LogKeys(checkpoint, artifact, config.default_artifact_key, published)


async def _record_and_list(
    storage: Storage, artifact: dict[str, ArtifactSigner], config: Config
) -> list[PublishedKey]:
    for name, signer in artifact.items():
        record = {
            "name": name,
            "algorithm": signer.algorithm,
            "pem": public_key_pem(signer.public_key).decode(),
        }
        await storage.set_meta_once(
            _REGISTRY_PREFIX + signer.key_id, orjson.dumps(record).decode()
        )

    active = {signer.key_id: name for name, signer in artifact.items()}
    published = []
    for meta_key, value in sorted((await storage.list_meta(_REGISTRY_PREFIX)).items()):
        key_id = meta_key.removeprefix(_REGISTRY_PREFIX)
        record = orjson.loads(value)
        if key_id in active:
            name = active[key_id]
            status = "default" if name == config.default_artifact_key else "active"
        else:
            name, status = record["name"], "retired"
        published.append(
            PublishedKey(name, record["algorithm"], key_id, record["pem"], status)
        )
    for name, key in config.artifact_keys.items():
        if key.retired and not any(p.name == name for p in published):
            logger.warning(
                "retired key was never recorded by this log; nothing to publish",
                extra={"key": name},
            )
    return published


def publish_keys(keys: LogKeys, directory: Path) -> None:
    """Write `log.vkey`, a PEM per artifact key and `keys.json`, atomically each.

    Active keys are `<name>.pem`; a retired key whose name was reused is
    `<name>-<first 16 hex of its key ID>.pem`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files = {"log.vkey": (keys.verifier_key + "\n").encode()}
    active_names = {p.name for p in keys.published if p.status != "retired"}
    for key in keys.published:
        filename = f"{key.name}.pem"
        if key.status == "retired" and key.name in active_names:
            filename = f"{key.name}-{key.key_id[:16]}.pem"
        files[filename] = key.pem.encode()
    files["keys.json"] = orjson.dumps(
        [k.as_json() for k in keys.published], option=orjson.OPT_INDENT_2
    )
    for filename, content in files.items():
        write_atomic(directory / filename, content)


__all__ = ["LogKeys", "PublishedKey", "SignerError", "open_keys", "publish_keys"]
