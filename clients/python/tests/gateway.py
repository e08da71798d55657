"""A real ``portcullis serve`` for the tests: the built binary, a key made
by ``portcullis keygen``, a temporary configuration and SQLite ledger on a
free loopback port. Stopped (SIGTERM, then SIGKILL) when the test session
ends, pass or fail.

The binary is ``$PORTCULLIS_BIN``, else the newest ``portcullis`` under
``$CARGO_TARGET_DIR`` (or the repository's ``target/``), release or debug.
Not finding it fails the tests: they are never skipped for it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[3]
AGENT = "py-bot"
SECRET = "python-client-test-bootstrap-secret"
ADMIN = "python-client-test-admin-token"


def find_binary() -> Path:
    explicit = os.environ.get("PORTCULLIS_BIN")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise RuntimeError(f"PORTCULLIS_BIN={explicit} is not a file")
        return path
    roots = [Path(os.environ["CARGO_TARGET_DIR"])] if os.environ.get("CARGO_TARGET_DIR") else []
    roots.append(REPO / "target")
    found = [
        root / profile / "portcullis"
        for root in roots
        for profile in ("release", "debug")
        if (root / profile / "portcullis").is_file()
    ]
    if not found:
        raise RuntimeError(
            "no portcullis binary: build it (cargo build -p portcullis-cli) or set PORTCULLIS_BIN"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


CONFIG = """
[server]
listen = "{listen}"
issuer = "http://{listen}"

[store]
url = "sqlite://ledger.db"

[tokens]
access_ttl = "1m"
refresh_idle_ttl = "30m"
task_max_lifetime = "1h"
signing_key = "keys/k1.ed25519"

[audit]
redact = ["password", "secret", "token", "authorization"]

[[admins]]
name = "ops"
roles = ["admin", "approver", "auditor"]
token_sha256 = "{admin_sha}"

[[upstreams]]
name = "warehouse"
transport = "stdio"
command = ["{bin}", "demo-server", "warehouse"]
credential = {{ kind = "jwt" }}

[[tools]]
name = "warehouse.connect"
upstream = "warehouse"
risk = "low"
access = "read"

[[tools]]
name = "warehouse.query"
upstream = "warehouse"
risk = "low"
access = "read"
args_schema = {{ type = "object", properties = {{ sql = {{ type = "string", maxLength = 4096 }}, limit = {{ type = "integer", minimum = 1 }} }}, required = ["sql"], additionalProperties = false }}

[[tools]]
name = "warehouse.echo"
upstream = "warehouse"
risk = "low"
access = "read"

[[tools]]
name = "warehouse.validate"
upstream = "warehouse"
risk = "low"
access = "read"

[[tools]]
name = "warehouse.insert"
upstream = "warehouse"
risk = "high"
access = "write"

[[agent_types]]
name = "loader"
initial = "connect"
auto_advance = true
states = [
  {{ name = "connect", tools = ["warehouse.connect", "warehouse.echo"], next = ["query"] }},
  {{ name = "query",   tools = ["warehouse.query", "warehouse.echo"], next = ["write"] }},
  {{ name = "write",   tools = ["warehouse.validate", "warehouse.insert", "warehouse.echo"], next = ["done"], reverify = true }},
  {{ name = "done",    final = true }},
]

[[agents]]
id = "{agent}"
type = "loader"
tools = ["warehouse.connect", "warehouse.query", "warehouse.echo", "warehouse.validate", "warehouse.insert"]
bootstrap_sha256 = "{secret_sha}"
approve_high_risk = true

[policies]
cedar = ["policies/*.cedar"]
"""

POLICY = """
@id("no-sql-wildcards")
forbid(principal, action, resource == Tool::"warehouse.query")
when { context.args.sql like "*\\**" };
"""


@dataclass
class Gateway:
    url: str
    dir: Path
    bin: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return (self.dir / "serve.log").read_text(errors="replace")

    def admin(self, method: str, path: str, **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=10, **kw)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start(dir: Path, extra: str = "") -> Gateway:
    """Starts ``serve`` on the test configuration, with ``extra`` TOML
    (whole tables) appended to it."""
    bin = find_binary()
    keygen = subprocess.run(
        [bin, "keygen", "--out", dir / "keys" / "k1.ed25519"], capture_output=True, check=False
    )
    if keygen.returncode != 0:
        raise RuntimeError(f"keygen failed: {keygen.stderr.decode(errors='replace')}")
    listen = f"127.0.0.1:{free_port()}"
    (dir / "policies").mkdir(exist_ok=True)
    (dir / "policies" / "loader.cedar").write_text(POLICY)
    (dir / "portcullis.toml").write_text(
        CONFIG.format(
            listen=listen,
            bin=bin,
            agent=AGENT,
            admin_sha=sha256(ADMIN),
            secret_sha=sha256(SECRET),
        )
        + extra
    )
    log = open(dir / "serve.log", "wb")  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(
        [bin, "serve", "--config", dir / "portcullis.toml"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=dir,
    )
    gw = Gateway(url=f"http://{listen}", dir=dir, bin=bin, process=process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"serve exited early ({process.returncode}):\n{gw.log()}")
        try:
            if httpx.get(f"{gw.url}/readyz", timeout=1).status_code == 200:
                return gw
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    gw.stop()
    raise RuntimeError(f"serve not ready after 30 s:\n{gw.log()}")
