"""Throw-away SoftHSM2 tokens for tests.

SoftHSM finds its tokens through the file named by SOFTHSM2_CONF, read when
the module is initialised. `SoftHsmStore` writes such a file pointing at a
temporary directory and sets the variable in `os.environ`, so this process,
`subprocess` children and spawned signing workers all see the same store.
A process that has already initialised the module does not notice tokens
created afterwards, so `create_token` re-initialises it here.

Without SoftHSM the tests that need it are skipped, except under CI (the CI
variable set), where they fail: a CI image without SoftHSM is a broken image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
UTIL = "softhsm2-util"
USER_PIN = "4921-user"
SO_PIN = "7781-so"


def softhsm_missing() -> str | None:
    """Why SoftHSM2 cannot be used here, or None if it can."""
    if not Path(MODULE).exists():
        return f"SoftHSM2 is not installed ({MODULE} is missing)"
    if shutil.which(UTIL) is None:
        return f"SoftHSM2 is not installed ({UTIL} is not on PATH)"
    return None


def require_softhsm() -> None:
    """Skip the test without SoftHSM2, or fail it when running under CI."""
    reason = softhsm_missing()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; CI must install the softhsm2 package", pytrace=False)
    pytest.skip(f"{reason}; install the softhsm2 package to run the HSM tests")


@dataclass(frozen=True)
class SoftHsmToken:
    module: str
    label: str
    pin: str
    so_pin: str


class SoftHsmStore:
    """A SoftHSM2 token directory and configuration under `root`.

    Use as a context manager: it sets SOFTHSM2_CONF on entry and restores the
    previous value on exit.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokens = root / "tokens"
        self.conf = root / "softhsm2.conf"
        self._saved: str | None = None

    def __enter__(self) -> SoftHsmStore:
        require_softhsm()
        self.tokens.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"directories.tokendir = {self.tokens}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n",
            encoding="utf-8",
        )
        self._saved = os.environ.get("SOFTHSM2_CONF")
        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = self._saved

    def create_token(
        self, label: str, pin: str = USER_PIN, so_pin: str = SO_PIN
    ) -> SoftHsmToken:
        """Initialise a fresh token in the first free slot."""
        command = [UTIL, "--init-token", "--free", "--label", label]
        subprocess.run(
            [*command, "--so-pin", so_pin, "--pin", pin],
            check=True,
            capture_output=True,
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            timeout=30,
        )
        self._rescan()
        return SoftHsmToken(module=MODULE, label=label, pin=pin, so_pin=so_pin)

    @staticmethod
    def _rescan() -> None:
        # Finalize and initialize again, so this process reads the token
        # directory afresh (no session may be open across this call).
        import pkcs11

        pkcs11.lib(MODULE).reinitialize()
