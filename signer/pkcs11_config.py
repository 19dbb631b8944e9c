"""Where a PKCS#11 key lives and how to log in to its token.

The configuration names where the user PIN comes from (an environment
variable or a file), never the PIN itself, so it can be printed, logged and
put in error messages as it is.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from signer.pkcs11_session import DEFAULT_PIN_ENV, read_pin
from signer.pkcs11_worker import WorkerSpec


class Pkcs11Config(BaseModel):
    """One key in one token, found by the token's label and the key's label."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    module: str = Field(description="path of the PKCS#11 module (.so)")
    token_label: str = Field(min_length=1, description="CKA_LABEL of the token")
    key_label: str = Field(min_length=1, description="CKA_LABEL of the key pair")
    pin_env: str | None = Field(
        default=None,
        min_length=1,
        description=f"environment variable holding the PIN ({DEFAULT_PIN_ENV})",
    )
    pin_file: Path | None = Field(
        default=None, description="file holding the PIN on its first line"
    )
    workers: int = Field(
        default=2, ge=1, le=64, description="signing processes, one session each"
    )
    timeout: float = Field(
        default=10.0, gt=0, description="seconds a signing call may take"
    )
    start_timeout: float = Field(
        default=30.0, gt=0, description="seconds a worker may take to log in"
    )

    @model_validator(mode="after")
    def _one_pin_source(self) -> Pkcs11Config:
        if self.pin_env is not None and self.pin_file is not None:
            raise ValueError("give pin_env or pin_file, not both")
        return self

    def read_pin(self) -> str:
        """The PIN, read now from its file or environment variable."""
        return read_pin(self.pin_env, self.pin_file)

    def worker_spec(self, algorithm: str) -> WorkerSpec:
        return WorkerSpec(
            module=self.module,
            token_label=self.token_label,
            key_label=self.key_label,
            algorithm=algorithm,
            pin_env=self.pin_env,
            pin_file=None if self.pin_file is None else str(self.pin_file),
        )
