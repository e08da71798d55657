"""What the examples share: a gateway to talk to.

`sidecar(gateway)` yields `gateway` when one is given; otherwise it starts
`portcullis serve` with this folder's portcullis.toml in a temporary folder
(a key from `portcullis keygen`, a fresh SQLite ledger, a free loopback
port) and stops it afterwards. The `portcullis` binary is $PORTCULLIS_BIN,
else the one on PATH.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
AGENT = "research-bot"
SECRET = os.environ.get("PORTCULLIS_AGENT_SECRET", "demo-python-secret")


@contextmanager
def sidecar(gateway: str | None = None) -> Iterator[str]:
    if gateway:
        yield gateway
        return
    bin = os.environ.get("PORTCULLIS_BIN") or shutil.which("portcullis")
    if bin is None:
        raise SystemExit("no portcullis binary: set PORTCULLIS_BIN, put it on PATH, or pass --gateway")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="portcullis-example-") as tmp:
        dir = Path(tmp)
        shutil.copytree(HERE / "policies", dir / "policies")
        config = (HERE / "portcullis.toml").read_text()
        config = config.replace("127.0.0.1:8787", f"127.0.0.1:{port}")
        config = config.replace('"portcullis", "demo-server"', f'"{bin}", "demo-server"')
        (dir / "portcullis.toml").write_text(config)
        subprocess.run(
            [bin, "keygen", "--out", dir / "keys" / "signing.ed25519"], check=True, capture_output=True
        )
        with open(dir / "serve.log", "wb") as log:
            serve = subprocess.Popen(
                [bin, "serve", "--config", dir / "portcullis.toml"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                for _ in range(300):
                    if serve.poll() is not None:
                        raise SystemExit((dir / "serve.log").read_text())
                    try:
                        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as r:
                            if r.status == 200:
                                break
                    except OSError:
                        time.sleep(0.1)
                else:
                    raise SystemExit("the gateway was not ready within 30 s")
                yield url
            finally:
                serve.terminate()
                serve.wait(timeout=10)
