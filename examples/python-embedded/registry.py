"""A tool registry for an agent that runs in-process, rebuilt on the
embedded gateway (the `portcullis` Python module).

The agent registers plain Python functions as tools. Every call goes
through `task.call`, which decides it with the same planner as
`portcullis serve`, makes its write-ahead record durable in the embedded
SQLite ledger, runs the function only if allowed, and chains its outcome.

    pip install ./bindings/python
    python3 examples/python-embedded/registry.py [--config FILE]

It runs one allowed call, one call a policy denies and one call of a tool
the agent was not granted, completes the task, and then verifies the
ledger's hash chain with `portcullis audit verify` (the `portcullis` binary
from $PORTCULLIS_BIN or PATH; it also writes the signing key the verifier
reads, with `portcullis keygen`, when there is none).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import portcullis

HERE = Path(__file__).resolve().parent

Tool = Callable[..., Any]


class ToolRegistry:
    """Tools by gateway name; every call is decided and recorded first."""

    def __init__(self, task: portcullis.Task) -> None:
        self._task = task
        self._tools: dict[str, Tool] = {}

    def register(self, name: str) -> Callable[[Tool], Tool]:
        def add(fn: Tool) -> Tool:
            self._tools[name] = fn
            return fn

        return add

    def call(self, name: str, **args: Any) -> Any:
        fn = self._tools.get(name)
        if fn is None:
            raise KeyError(f"no tool {name!r} in the registry")
        # fn(**args) runs only if the gateway allows the call.
        return self._task.call(name, args, invoke=lambda a: fn(**a))


def portcullis_binary() -> str | None:
    return os.environ.get("PORTCULLIS_BIN") or shutil.which("portcullis")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=HERE / "portcullis.toml")
    opts = parser.parse_args()
    root = opts.config.resolve().parent
    (root / "reports").mkdir(exist_ok=True)
    (root / "reports" / "q3.txt").write_text("Q3: revenue up 4 %, churn down 1 %.\n")

    with portcullis.Gateway.open(opts.config) as gw:
        task = gw.start_task("report-bot", goal="summarise the Q3 report")
        tools = ToolRegistry(task)

        @tools.register("local.read_file")
        def read_file(path: str) -> str:
            return (root / path).read_text()

        @tools.register("local.summarise")
        def summarise(text: str) -> str:
            return text.split(".")[0] + "."

        @tools.register("local.send_email")
        def send_email(to: str, body: str) -> str:
            raise AssertionError("never runs: the agent was not granted this tool")

        text = tools.call("local.read_file", path="reports/q3.txt")
        print(f"allowed: local.read_file -> {text.strip()!r}")
        try:
            tools.call("local.read_file", path="../portcullis.toml")
        except portcullis.Denied as e:
            print(f"denied:  local.read_file -> {e.reason} {e.policy_ids}")
        try:
            tools.call("local.send_email", to="all@example.com", body=text)
        except portcullis.Denied as e:
            print(f"denied:  local.send_email -> {e.reason}")
        print(f"allowed: local.summarise -> {tools.call('local.summarise', text=text)!r}")
        task.complete()
        print(f"task {task.task_id} {task.status}")

    bin = portcullis_binary()
    if bin is None:
        print("no portcullis binary (PORTCULLIS_BIN or PATH): skipping `audit verify`")
        return 0
    key = root / "keys" / "signing.ed25519"
    if not key.exists():
        subprocess.run([bin, "keygen", "--out", key], check=True, capture_output=True)
    verify = subprocess.run(
        [bin, "audit", "verify", "--config", opts.config, "--quiet"],
        capture_output=True,
        text=True,
    )
    print(f"portcullis audit verify: {verify.stdout.strip() or verify.stderr.strip()}")
    return verify.returncode


if __name__ == "__main__":
    sys.exit(main())
