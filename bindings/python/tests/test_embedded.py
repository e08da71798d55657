"""The `portcullis` module against its real parts: the engine and planner
of the Rust library, the embedded SQLite ledger, and `portcullis audit
verify|export` (the binary from $PORTCULLIS_BIN, else the newest under
$CARGO_TARGET_DIR or target/) reading that ledger."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

import portcullis

REPO = Path(__file__).resolve().parents[3]

CONFIG = """
[store]
url = "sqlite://ledger/portcullis.db"

[tokens]
signing_key = "keys/k1.ed25519"

[audit]
redact = ["password", "token"]

[anomaly]
denials = {{ count = {denials}, action = "halt" }}

[[upstreams]]
name = "local"
transport = "stdio"
command = ["python3"]

[[tools]]
name = "local.read"
upstream = "local"
risk = "low"
access = "read"
args_schema = {{ type = "object", properties = {{ path = {{ type = "string" }}, token = {{ type = "string" }} }}, required = ["path"], additionalProperties = false }}

[[tools]]
name = "local.write"
upstream = "local"
risk = "high"
access = "write"
args_schema = {{ type = "object", properties = {{ path = {{ type = "string" }} }}, required = ["path"], additionalProperties = false }}

[[tools]]
name = "local.delete"
upstream = "local"
risk = "high"
access = "write"

[[agent_types]]
name = "worker"
initial = "read"
auto_advance = true
states = [
  {{ name = "read",  tools = ["local.read"], next = ["write"] }},
  {{ name = "write", tools = ["local.write"], next = ["done"] }},
  {{ name = "done",  final = true }},
]

[[agents]]
id = "bot"
type = "worker"
tools = ["local.read", "local.write"]
bootstrap_sha256 = "{sha}"
approve_high_risk = {approve}

[policies]
cedar = ["policies/*.cedar"]
"""

POLICY = """
@id("no-secrets-dir")
forbid(principal, action, resource == Tool::"local.read")
when { context.args.path like "secrets/*" };
"""


def binary() -> Path:
    explicit = os.environ.get("PORTCULLIS_BIN")
    if explicit:
        return Path(explicit)
    roots = [Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else []
    roots.append(REPO / "target")
    found = [r / p / "portcullis" for r in roots for p in ("release", "debug")]
    found = [f for f in found if f.is_file()]
    if not found:
        raise RuntimeError("no portcullis binary: build it or set PORTCULLIS_BIN")
    return max(found, key=lambda p: p.stat().st_mtime)


def write_config(dir: Path, approve: bool = False, denials: int = 100) -> Path:
    (dir / "policies").mkdir(exist_ok=True)
    (dir / "policies" / "p.cedar").write_text(POLICY)
    sha = hashlib.sha256(b"unused").hexdigest()
    path = dir / "portcullis.toml"
    path.write_text(
        CONFIG.format(sha=sha, approve="true" if approve else "false", denials=denials)
    )
    return path


def export(config: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [binary(), "audit", "export", "--config", config], capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def verify(config: Path) -> subprocess.CompletedProcess[str]:
    key = config.parent / "keys" / "k1.ed25519"
    if not key.exists():
        subprocess.run([binary(), "keygen", "--out", key], check=True, capture_output=True)
    return subprocess.run(
        [binary(), "audit", "verify", "--config", config, "--quiet"], capture_output=True, text=True
    )


def test_allowed_runs_the_tool_and_denied_does_not(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    ran: list[dict[str, Any]] = []

    def read(args: dict[str, Any]) -> dict[str, Any]:
        ran.append(args)
        return {"text": "hello", "n": 1}

    with portcullis.Gateway.open(config) as gw:
        task = gw.start_task("bot", goal="read a file")
        assert task.state == "read" and task.status == "active"
        assert task.call("local.read", {"path": "notes/a.txt", "token": "s3cr3t"}, invoke=read) == {
            "text": "hello",
            "n": 1,
        }
        with pytest.raises(portcullis.Denied) as e:
            task.call("local.read", {"path": "secrets/key"}, invoke=read)
        assert e.value.reason == "policy_forbid" and e.value.policy_ids == ["no-secrets-dir"]
        with pytest.raises(portcullis.Denied) as e:
            task.call("local.delete", {"path": "x"}, invoke=read)
        assert e.value.reason == "tool_not_granted"
        with pytest.raises(portcullis.Denied) as e:
            task.call("local.read", {"path": 3}, invoke=read)
        assert e.value.reason == "args_invalid"
        assert len(ran) == 1
        task.complete()
        with pytest.raises(portcullis.Denied) as e:
            task.call("local.read", {"path": "notes/a.txt"}, invoke=read)
        assert e.value.reason == "task_not_active"
        assert len(ran) == 1

    records = export(config)
    kinds = [r["kind"] for r in records]
    assert kinds == [
        "task.started",
        "call.allowed",
        "call.completed",
        "call.denied",
        "call.denied",
        "call.denied",
        "task.completed",
        "call.denied",
    ], kinds
    allowed = records[1]
    assert allowed["args"] == {"path": "notes/a.txt", "token": "[redacted]"}
    assert "s3cr3t" not in json.dumps(records)
    completed = records[2]
    digest = hashlib.sha256(json.dumps({"text": "hello", "n": 1}, separators=(",", ":")).encode())
    assert completed["decision"] == "allow" and completed["result_digest"] == digest.hexdigest()
    assert records[3]["reason"] == "policy_forbid"
    result = verify(config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_tool_that_raises_is_recorded_as_an_error(tmp_path: Path) -> None:
    config = write_config(tmp_path)

    def boom(args: dict[str, Any]) -> None:
        raise RuntimeError("password=hunter2")

    with portcullis.Gateway.open(config) as gw:
        task = gw.start_task("bot", goal="fail")
        with pytest.raises(RuntimeError):
            task.call("local.read", {"path": "a"}, invoke=boom)
    records = export(config)
    assert records[-1]["kind"] == "call.completed" and records[-1]["decision"] == "error"
    assert records[-1]["detail"] == "the tool raised RuntimeError"
    assert "hunter2" not in json.dumps(records)
    assert verify(config).returncode == 0


def test_workflow_transitions_and_state_violations(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with portcullis.Gateway.open(config) as gw:
        task = gw.start_task("bot", goal="flow")
        task.call("local.read", {"path": "a"}, invoke=lambda a: "ok")
        task.call("local.write", {"path": "a"}, invoke=lambda a: "written")
        assert task.state == "write"
        with pytest.raises(portcullis.Denied) as e:
            task.call("local.read", {"path": "a"}, invoke=lambda a: "ok")
        assert e.value.reason == "state_violation"
        assert task.transition("done") == ("write", "done", False)
        with pytest.raises(portcullis.Denied) as e:
            task.transition("read")
        assert e.value.reason in ("state_violation", "task_not_active")
    kinds = [r["kind"] for r in export(config)]
    assert "state.transition" in kinds
    assert verify(config).returncode == 0


def test_approval_and_halt_are_typed(tmp_path: Path) -> None:
    config = write_config(tmp_path, approve=True, denials=3)
    with portcullis.Gateway.open(config) as gw:
        task = gw.start_task("bot", goal="approval")
        task.call("local.read", {"path": "a"}, invoke=lambda a: "ok")
        with pytest.raises(portcullis.ApprovalPending) as e:
            task.call("local.write", {"path": "a"}, invoke=lambda a: "never")
        assert e.value.reason == "approval_required" and e.value.elevation_id is None

        halted = gw.start_task("bot", goal="halt")
        reasons = []
        for _ in range(4):
            try:
                halted.call("local.read", {"path": "secrets/x"}, invoke=lambda a: "never")
            except portcullis.Denied as d:
                reasons.append(d)
        # The third denial fires the rule; the call after it meets a halted task.
        assert [d.reason for d in reasons] == ["policy_forbid"] * 3 + ["anomaly_halt"]
        assert isinstance(reasons[-1], portcullis.TaskHalted)
        assert halted.status == "halted"
    kinds = [r["kind"] for r in export(config)]
    assert "task.halted" in kinds
    assert verify(config).returncode == 0


def test_arguments_must_be_json_like(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with portcullis.Gateway.open(config) as gw:
        task = gw.start_task("bot", goal="types")
        with pytest.raises(TypeError):
            task.call("local.read", {"path": object()}, invoke=lambda a: "never")
        with pytest.raises(ValueError):
            task.call("local.read", {"path": "a", "n": 2**70}, invoke=lambda a: "never")
        deep: Any = "x"
        for _ in range(100):
            deep = [deep]
        with pytest.raises(ValueError):
            task.call("local.read", {"path": deep}, invoke=lambda a: "never")


def test_a_bad_configuration_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "portcullis.toml"
    bad.write_text("[[agents]]\nid = 1\n")
    with pytest.raises(portcullis.ConfigError):
        portcullis.Gateway.open(bad)
    config = write_config(tmp_path)
    text = config.read_text().replace("sqlite://ledger/portcullis.db", "postgres://127.0.0.1/x")
    config.write_text(text)
    with pytest.raises(portcullis.LedgerError):
        portcullis.Gateway.open(config)


def test_an_edited_record_fails_verification(tmp_path: Path) -> None:
    import sqlite3

    config = write_config(tmp_path)
    with portcullis.Gateway.open(config) as gw:
        task = gw.start_task("bot", goal="tamper")
        task.call("local.read", {"path": "a"}, invoke=lambda a: "ok")
    assert verify(config).returncode == 0
    db = sqlite3.connect(tmp_path / "ledger" / "portcullis.db")
    # Edit one stored record: the tools its task.started names.
    changed = db.execute(
        "update audit_events set event = replace(event, 'local.read', 'local.r3ad') "
        "where kind = 'task.started'"
    ).rowcount
    db.commit()
    assert changed == 1
    db.close()
    assert verify(config).returncode != 0


def test_load_decides_in_memory_and_records_nothing(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    gw = portcullis.Gateway.load(config)
    task = gw.start_task("bot", goal="memory")
    assert task.call("local.read", {"path": "a"}, invoke=lambda a: "ok") == "ok"
    with pytest.raises(portcullis.Denied) as e:
        task.call("local.read", {"path": "secrets/a"}, invoke=lambda a: "never")
    assert e.value.reason == "policy_forbid"
    gw.close()
    assert not (tmp_path / "ledger").exists()
