"""The `signer` command: signing through the log, and HSM key administration.

    signer sign FILE... --log URL [...]              (see `signer.sign_cmd`)
    signer approve REQUEST_ID --log URL --key FILE   (see `signer.approve_cmd`)
    signer key generate --module M --token LABEL --label KEY --algorithm ALG
    signer key list --module M --token LABEL
    signer key export-pem --module M --token LABEL --label KEY [--output F]
    signer key export-vkey --module M --token LABEL --label KEY --name ORIGIN

Results go to stdout, diagnoses to stderr. Exit status: 0 done, 1 failed,
2 usage error. The PIN comes from an environment variable (default
SIGNER_PKCS11_PIN) or a file, never from the command line, where other users
could read it in the process list.

Each command adds its subparser in a function listed in `_COMMANDS` (the
key commands here, the others in their own modules) and stores its handler
as the subparser's `run` default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from signer import approve_cmd, sign_cmd
from signer.atomicfile import write_atomic
from signer.keys import (
    ECDSA_P256_SHA256,
    ECDSA_P384_SHA256,
    RSA_PKCS1V15_SHA256,
    RSA_PSS_SHA256,
    SignerError,
)
from signer.pkcs11_config import Pkcs11Config
from signer.pkcs11_keys import (
    KeyInfo,
    export_public_pem,
    export_verifier_key,
    generate_key,
    list_keys,
)
from signer.pkcs11_session import DEFAULT_PIN_ENV, ED25519, read_pin

logger = logging.getLogger(__name__)

MODULE_ENV = "SIGNER_PKCS11_MODULE"

# Command-line names of the key algorithms, and the names the configuration
# and the leaves use.
ALGORITHMS = {
    "ecdsa-p256": ECDSA_P256_SHA256,
    "ecdsa-p384": ECDSA_P384_SHA256,
    "rsa3072-pkcs1v15": RSA_PKCS1V15_SHA256,
    "rsa3072-pss": RSA_PSS_SHA256,
    "ed25519": ED25519,
}

Handler = Callable[[argparse.Namespace], int]


def _version() -> str:
    try:
        return metadata.version("logsign")
    except metadata.PackageNotFoundError:
        return "unknown"


def _token_options() -> argparse.ArgumentParser:
    """The options every command that opens a PKCS#11 token shares."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("token")
    module = os.environ.get(MODULE_ENV)
    group.add_argument(
        "--module",
        default=module,
        required=module is None,
        metavar="PATH",
        help=f"PKCS#11 module (.so) to load (default: ${MODULE_ENV}); "
        "SoftHSM2's is /usr/lib/softhsm/libsofthsm2.so",
    )
    group.add_argument(
        "--token",
        required=True,
        metavar="LABEL",
        help="label of the token (slot numbers change; labels do not)",
    )
    pin = group.add_mutually_exclusive_group()
    pin.add_argument(
        "--pin-env",
        metavar="VAR",
        help=f"environment variable holding the user PIN (default: {DEFAULT_PIN_ENV})",
    )
    pin.add_argument(
        "--pin-file", type=Path, metavar="FILE", help="file holding the user PIN"
    )
    return parent


def _add_key(commands: argparse._SubParsersAction[Any]) -> None:
    tokens = _token_options()
    key = commands.add_parser(
        "key",
        help="create and inspect keys in a PKCS#11 token",
        description="Create keys inside a PKCS#11 token (HSM) and export their "
        "public halves. Private keys are generated sensitive and "
        "non-extractable: they never leave the token.",
    )
    actions = key.add_subparsers(dest="action", metavar="ACTION", required=True)

    generate = actions.add_parser(
        "generate",
        parents=[tokens],
        help="generate a key pair inside the token",
        description="Generate a key pair inside the token. Artifact keys sign "
        "SHA-256 digests (ECDSA P-256 is the default; RSA keys are 3072 bits); "
        "ed25519 makes the log's checkpoint (signed note) key.",
    )
    generate.add_argument("--label", required=True, help="label of the new key")
    generate.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default="ecdsa-p256",
        help="signature algorithm the key is for (default: ecdsa-p256)",
    )
    generate.add_argument("--json", action="store_true", help="print JSON")
    generate.set_defaults(run=_generate)

    listing = actions.add_parser(
        "list",
        parents=[tokens],
        help="list the key pairs in the token",
        description="List the key pairs in the token with their key IDs (the "
        "SHA-256 of the public key's DER, as leaves record it). Logs in with "
        "the PIN to see private keys.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_list)

    pem = actions.add_parser(
        "export-pem",
        parents=[tokens],
        help="write a public key as PEM",
        description="Write the public key as a SubjectPublicKeyInfo PEM, for "
        "`openssl dgst -verify` and `cosign verify-blob --key`. Logs in only "
        "if --pin-env or --pin-file is given.",
    )
    pem.add_argument("--label", required=True, help="label of the key")
    pem.add_argument(
        "--output", type=Path, metavar="FILE", help="write here instead of stdout"
    )
    pem.set_defaults(run=_export_pem)

    vkey = actions.add_parser(
        "export-vkey",
        parents=[tokens],
        help="print an Ed25519 key as a signed-note verifier key",
        description="Print the verifier key <name>+<key ID>+<key> of an "
        "Ed25519 key, as log.vkey holds it. Logs in only if --pin-env or "
        "--pin-file is given.",
    )
    vkey.add_argument("--label", required=True, help="label of the Ed25519 key")
    vkey.add_argument(
        "--name", required=True, metavar="ORIGIN", help="key name: the log's origin"
    )
    vkey.set_defaults(run=_export_vkey)


# Each adds one command's subparser, whose `run` default handles it.
_COMMANDS: list[Callable[[argparse._SubParsersAction[Any]], object]] = [
    sign_cmd.add_parser,
    approve_cmd.add_parser,
    _add_key,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signer",
        description="Sign artifacts through a transparency log, and manage "
        "the log's HSM keys.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="say more on stderr (-v: progress, -vv: debugging)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(commands)
    return parser


def _explicit_pin(args: argparse.Namespace) -> str | None:
    """The PIN if the user pointed at one; export commands need none."""
    if args.pin_env is None and args.pin_file is None:
        return None
    return read_pin(args.pin_env, args.pin_file)


def _info_json(info: KeyInfo) -> dict[str, Any]:
    return {
        "label": info.label,
        "kind": info.kind,
        "key_id": info.key_id,
        "ck_id": info.ck_id,
        "private": info.has_private,
        "sensitive": info.sensitive,
        "extractable": info.extractable,
    }


def _generate(args: argparse.Namespace) -> int:
    algorithm = ALGORITHMS[args.algorithm]
    config = Pkcs11Config(
        module=args.module,
        token_label=args.token,
        key_label=args.label,
        pin_env=args.pin_env,
        pin_file=args.pin_file,
    )
    logger.info(
        "generating key",
        extra={"token": args.token, "key": args.label, "algorithm": algorithm},
    )
    info = generate_key(config, algorithm)
    if args.json:
        print(json.dumps({**_info_json(info), "algorithm": algorithm}))
    else:
        print(f"label:     {info.label}")
        print(f"algorithm: {algorithm}")
        print(f"key:       {info.kind}, sensitive, not extractable")
        print(f"key id:    {info.key_id}")
    return 0


def _list(args: argparse.Namespace) -> int:
    pin = read_pin(args.pin_env, args.pin_file)
    keys = list_keys(args.module, args.token, pin)
    if args.json:
        print(json.dumps([_info_json(info) for info in keys]))
        return 0
    for info in keys:
        if not info.has_private:
            private = "public key only"
        elif info.sensitive and not info.extractable:
            private = "private: sensitive, not extractable"
        else:
            private = "private: EXTRACTABLE OR NOT SENSITIVE"
        print(f"{info.label}\t{info.kind}\t{info.key_id or '-'}\t{private}")
    if not keys:
        print(f"signer: token {args.token!r} holds no key pairs", file=sys.stderr)
    return 0


def _export_pem(args: argparse.Namespace) -> int:
    pem = export_public_pem(args.module, args.token, args.label, _explicit_pin(args))
    if args.output is None:
        sys.stdout.write(pem.decode("ascii"))
    else:
        if args.output.exists() and not args.output.is_file():
            args.output.write_bytes(pem)  # a pipe or device, e.g. /dev/stdout
        else:
            write_atomic(args.output.resolve(), pem)  # a symlink's target
        print(f"signer: wrote {args.output}", file=sys.stderr)
    return 0


def _export_vkey(args: argparse.Namespace) -> int:
    vkey = export_verifier_key(
        args.module, args.token, args.label, args.name, _explicit_pin(args)
    )
    print(vkey)
    return 0


def _configure_logging(verbosity: int) -> None:
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr, format="signer: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    _configure_logging(args.verbose)
    run: Handler = args.run
    try:
        return run(args)
    except SignerError as exc:
        print(f"signer: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. a note key name that is not valid
        print(f"signer: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"signer: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
