"""`verifier monitor` and `verifier audit` on a real server and the reference log.

The reference log (tests/vectors/reference-log) was written by an independent
implementation; its entries are not our leaves, so it is read with --foreign.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import inspect
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.serverproc import ServerProcess
from verifier import leaf as leaf_module
from verifier.audit import is_canonical_leaf
from verifier.checkpoint import open_checkpoint
from verifier.cli import main
from verifier.errors import FormatError
from verifier.leaf import (
    Approval,
    Artifact,
    ArtifactSignature,
    Build,
    Identity,
    Leaf,
    Policy,
    Source,
    encode_leaf,
    parse_leaf,
)
from verifier.monitor import MonitorState, Rebuild, WatchRules, save_state
from verifier.note import NoteVerifier

REFERENCE = Path(__file__).parent / "vectors" / "reference-log"
REFERENCE_KEY = (
    "example.com/reference-log+9805c16f+AdRRHVl2s3Mls4AxS7AItLtUMGKfKoNDewD0Q8tVWrEf"
)
ORIGIN = "monitor.example/log"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def alerts(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def entry(name: str, digest: str) -> dict[str, Any]:
    return {"artifact": {"name": name, "sha256": digest}}


def digest_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- The reference log -------------------------------------------------------


def test_audit_the_reference_log(capsys: pytest.CaptureFixture[str]) -> None:
    # 274 entry bundles: enough for the worker processes to be used.
    code, out, err = run(
        capsys, "audit", "--log", str(REFERENCE), "--log-key", REFERENCE_KEY,
        "--foreign", "--json", "--jobs", "2",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] is True and report["problems"] == []
    assert report["entries"] == report["tree_size"] == 70000
    assert report["tiles"] == {"0": 274, "1": 2, "2": 1}
    assert report["root_hash"] == "DOIH1UjmA2lX7Q5iDvyezJXT7wAdYPzlI7wKr5JrR/o="


def test_audit_without_foreign_reports_the_leaves(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(
        capsys, "audit", "--log", str(REFERENCE), "--log-key", REFERENCE_KEY
    )
    assert code == 1
    assert "FAILED, 70000 problems" in out
    assert "leaves:  0 valid, 70,000 invalid" in out
    assert "audit FAILED: 70000 problems; first: entry 0 is not a valid leaf" in err


def test_monitor_the_reference_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    argv = ["monitor", "--log", str(REFERENCE), "--log-key", REFERENCE_KEY]
    argv += ["--state", str(state), "--foreign", "--once"]
    code, out, err = run(capsys, *argv)
    assert (code, out) == (0, "")
    assert "checked 70000 new entries, 0 alerts, 70000 not in our leaf format" in err
    stored = json.loads((state / "state.json").read_text())
    assert stored["next_index"] == 70000
    assert stored["checkpoint"] == (REFERENCE / "checkpoint").read_text()

    # Nothing new: nothing to check.
    code, out, err = run(capsys, *argv)
    assert (code, out) == (0, "") and "checked 0 new entries" in err


def test_monitor_resumes_from_an_older_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verifier = NoteVerifier.from_key(REFERENCE_KEY)
    older = (REFERENCE / "older-checkpoints" / "checkpoint.65536").read_bytes()
    state = tmp_path / "state"
    state.mkdir()
    save_state(state, MonitorState(open_checkpoint(older, verifier), 65536))
    code, out, err = run(
        capsys, "monitor", "--log", str(REFERENCE), "--log-key", REFERENCE_KEY,
        "--state", str(state), "--foreign", "--once",
    )  # fmt: skip
    assert (code, out) == (0, ""), err
    assert "checked 4464 new entries" in err


def test_a_failed_state_save_keeps_the_old_state_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    verifier = NoteVerifier.from_key(REFERENCE_KEY)
    older = (REFERENCE / "older-checkpoints" / "checkpoint.65536").read_bytes()
    newer = (REFERENCE / "checkpoint").read_bytes()
    save_state(tmp_path, MonitorState(open_checkpoint(older, verifier), 65536))
    before = sorted(p.name for p in tmp_path.iterdir())
    saved = (tmp_path / "state.json").read_bytes()

    def disk_full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("verifier.monitor.os.replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_state(tmp_path, MonitorState(open_checkpoint(newer, verifier), 70000))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "state.json").read_bytes() == saved


def test_monitor_polls_until_stopped(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "verifier.cli", "monitor", "--log", str(REFERENCE),
        "--log-key", REFERENCE_KEY, "--state", str(tmp_path / "state"),
        "--foreign", "--interval", "0.2",
    ]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    lines = [process.stderr.readline() for _ in range(2)]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert "checked 70000 new entries" in lines[0]
    assert "checked 0 new entries" in lines[1]


def test_monitor_refuses_a_state_from_another_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text(
        json.dumps({"version": 1, "checkpoint": "x\n1\n\n", "next_index": 0})
    )
    code, _, err = run(
        capsys, "monitor", "--log", str(REFERENCE), "--log-key", REFERENCE_KEY,
        "--state", str(state), "--once",
    )  # fmt: skip
    assert code == 1 and "does not verify with the log key" in err


# --- A real server -----------------------------------------------------------


class Webhook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()


@pytest.fixture
def webhook() -> Iterator[str]:
    Webhook.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    server.shutdown()
    server.server_close()


def test_monitor_a_server_and_resume_after_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, state = tmp_path / "data", tmp_path / "state"
    server = ServerProcess(data, "--origin", ORIGIN)
    try:
        for i in range(5):
            assert server.post("api/v1/entries", entry(f"a{i}", f"{i:064x}"))[0] == 201
        vkey = str(data / "public" / "log.vkey")
        argv = ["monitor", "--log-key", vkey, "--state", str(state), "--once"]
        argv += ["--key", str(data / "public" / "default.pem")]
        code, out, err = run(capsys, *argv, "--log", server.url)
        assert (code, out) == (0, ""), err
        assert "size 5: checked 5 new entries, 0 alerts; next index 5" in err
    finally:
        assert server.stop() == 0

    server = ServerProcess(data, "--origin", ORIGIN)
    try:
        batch = [entry(f"b{i}", digest_of(f"b{i}")) for i in range(300)]
        assert server.post("api/v1/entries/batch", {"entries": batch})[0] == 201
        code, out, err = run(capsys, *argv, "--log", server.url)
        assert (code, out) == (0, ""), err
        assert "size 305: checked 300 new entries, 0 alerts; next index 305" in err
        stored = json.loads((state / "state.json").read_text())
        assert stored["next_index"] == 305
        assert stored["checkpoint"] == server.get("checkpoint").decode()

        # The audit agrees, over HTTP.
        code, out, err = run(capsys, "audit", "--log", server.url, "--log-key", vkey)
        assert code == 0, err
        assert "leaves:  305 valid, 0 invalid" in out
    finally:
        assert server.stop() == 0


def test_monitor_alerts_on_watch_rules_and_rebuilds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], webhook: str
) -> None:
    server = ServerProcess(tmp_path / "data", "--origin", ORIGIN)
    try:
        signed = [
            entry("dist/app.tar.gz", digest_of("app")),
            entry("dist/lib.so", digest_of("lib as signed")),
            entry("evil.bin", digest_of("evil")),
        ]
        assert server.post("api/v1/entries/batch", {"entries": signed})[0] == 201
        rules = tmp_path / "rules.toml"
        rules.write_text(
            'issuers = ["logserver/token"]\n'
            'subjects = ["boot*"]\n'
            'artifact_names = ["dist/*"]\n'
            'rules = ["builtin-bootstrap-token"]\n'
        )
        manifest = tmp_path / "SHA256SUMS"
        manifest.write_text(
            f"{digest_of('app')}  dist/app.tar.gz\n"
            f"{digest_of('lib as rebuilt')}  dist/lib.so\n"
        )
        code, out, err = run(
            capsys, "monitor", "--log", server.url,
            "--log-key", str(tmp_path / "data" / "public" / "log.vkey"),
            "--state", str(tmp_path / "state"), "--watch", str(rules),
            "--manifest", str(manifest), "--webhook", webhook, "--once",
        )  # fmt: skip
    finally:
        assert server.stop() == 0
    assert code == 1
    found = alerts(out)
    assert [(a["alert"], a["index"]) for a in found] == [
        ("rebuild_mismatch", 1),
        ("watch_rule", 2),
        ("not_rebuilt", 2),
    ]
    assert found[1]["message"] == "artifact name 'evil.bin' is not allowed"
    assert digest_of("lib as rebuilt") in found[0]["message"]
    assert found[0]["evidence"]["inclusion_proof"]
    assert Webhook.received == found
    assert "3 alerts" in err


def test_rebuild_directory_names_files_by_relative_path(tmp_path: Path) -> None:
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "app.tar.gz").write_bytes(b"app")
    rebuild = Rebuild.from_directory(tmp_path)
    assert rebuild.digests == {"dist/app.tar.gz": hashlib.sha256(b"app").hexdigest()}
    bad = tmp_path / "bad.toml"
    bad.write_text("names = ['x']\n")
    with pytest.raises(FormatError, match="unknown keys"):
        WatchRules.load(bad)


# --- The audit's fast leaf check ---------------------------------------------

HEX = st.text("0123456789abcdef", min_size=64, max_size=64)
TEXT = st.text(max_size=40)
B64 = st.binary(min_size=1, max_size=80).map(lambda b: base64.b64encode(b).decode())
LEAVES = st.builds(
    Leaf,
    artifact=st.builds(
        Artifact,
        name=st.text(min_size=1, max_size=60).filter(lambda s: s.isprintable()),
        sha256=HEX,
        size=st.none() | st.integers(0, (1 << 63) - 1),
    ),
    build=st.none() | st.builds(Build, builder=st.none() | TEXT, invocation=TEXT),
    identity=st.builds(
        Identity,
        issuer=TEXT,
        subject=TEXT,
        claims=st.dictionaries(TEXT, TEXT, max_size=2) | st.just({}),
    ),
    policy=st.builds(
        Policy,
        approvals=st.lists(
            st.builds(Approval, key_id=HEX, signature=B64), max_size=2
        ).map(tuple)
        | st.just(()),
        mode=st.sampled_from(["automated", "ceremonial"]),
        policy_sha256=HEX,
        rule=TEXT,
    ),
    signature=st.builds(
        ArtifactSignature,
        algorithm=st.sampled_from(["ecdsa-p256-sha256", "rsa-pss-sha256"]),
        key_id=HEX,
        value=B64,
    ),
    source=st.none() | st.builds(Source, commit=TEXT, ref=st.none() | TEXT),
    timestamp=st.integers(0, (1 << 63) - 1),
)


def accepted_by_parse_leaf(data: bytes) -> bool:
    try:
        parse_leaf(data)
    except FormatError:
        return False
    return True


@given(LEAVES)
def test_the_fast_leaf_check_accepts_plain_leaves(leaf: Leaf) -> None:
    data = encode_leaf(leaf)
    plain = not leaf.identity.claims and not leaf.policy.approvals and b"\\" not in data
    assert is_canonical_leaf(data) == plain


@given(LEAVES, st.data())
def test_the_fast_leaf_check_never_accepts_what_parse_leaf_refuses(
    leaf: Leaf, data: st.DataObject
) -> None:
    raw = bytearray(encode_leaf(leaf))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if action == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "delete":
            del raw[at]
        else:
            raw.insert(at, data.draw(st.sampled_from(b' ,"0\\{}[]:.-e\x7f\xc2\x85')))
    mutated = bytes(raw)
    if is_canonical_leaf(mutated):
        assert accepted_by_parse_leaf(mutated)


PLAIN = (
    b'{"artifact":{"name":"a","sha256":"' + b"0" * 64 + b'","size":5},'
    b'"identity":{"claims":{},"issuer":"i","subject":"s"},'
    b'"policy":{"approvals":[],"mode":"automated","policy_sha256":"'
    + b"1" * 64
    + b'","rule":"r"},"signature":{"algorithm":"ecdsa-p256-sha256","key_id":"'
    + b"2" * 64
    + b'","value":"MEUCIQ=="},"timestamp":1700000000,"version":1}'
)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b'"size":5', b'"size":05'),
        (b'"size":5', b'"size":9223372036854775808'),
        (b'"size":5', b'"size":5.0'),
        (b'"size":5', b'"size":null'),
        (b'"version":1', b'"version":2'),
        (b'"timestamp":1700000000', b'"timestamp":-1'),
        (b'"name":"a"', b'"name":""'),
        (b'"name":"a"', b'"name":"\xc2\x85"'),  # a C1 control character
        (b'"name":"a"', b'"name":"\x7f"'),
        (b'"name":"a"', b'"name":"' + b"a" * 1025 + b'"'),
        (b'"name":"a"', b'"name":"\xff"'),  # not UTF-8
        (b'"issuer":"i"', b'"issuer":"\\u0069"'),  # not the shortest escape
        (b'"value":"MEUCIQ=="', b'"value":"MEUCIR=="'),  # non-canonical base64
        (b'"value":"MEUCIQ=="', b'"value":"MEUCIQ"'),
        (b'"sha256":"0', b'"sha256":"A'),
        (b'"mode":"automated"', b'"mode":"manual"'),
        (b',"version":1}', b',"version":1} '),
        (b'"artifact":{', b'"artifact": {'),
    ],
)
def test_the_fast_leaf_check_refuses_invalid_leaves(old: bytes, new: bytes) -> None:
    assert is_canonical_leaf(PLAIN) and accepted_by_parse_leaf(PLAIN)
    assert old in PLAIN
    bad = PLAIN.replace(old, new, 1)
    assert not is_canonical_leaf(bad)
    assert not accepted_by_parse_leaf(bad)


# The fast check restates the Leaf model. If the model changes, review
# `verifier.audit.is_canonical_leaf` (a stricter model could make it accept
# leaves parse_leaf refuses), then update this digest.
LEAF_MODEL_DIGEST = "529941d3dd8e53e2a5f03827fe22d7ef79cc7acb49b5cbf9c6e4b8b58def4c93"


def test_the_leaf_model_is_the_one_the_fast_check_restates() -> None:
    schema = json.dumps(Leaf.model_json_schema(), sort_keys=True)
    validators = inspect.getsource(leaf_module._no_control_characters)
    validators += inspect.getsource(leaf_module._canonical_base64)
    digest = hashlib.sha256((schema + validators).encode()).hexdigest()
    assert digest == LEAF_MODEL_DIGEST, "the Leaf model changed: see the comment above"
