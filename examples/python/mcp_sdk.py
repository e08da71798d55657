"""The official MCP Python SDK (2.x) through the gateway, in both protocol
eras, with the task's tokens kept fresh by `task.auth`.

    pip install ./clients/python 'mcp==2.3.0'
    python3 examples/python/mcp_sdk.py [--gateway URL]
"""

from __future__ import annotations

import argparse
import asyncio

from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from sidecar import AGENT, SECRET, sidecar

from portcullis_client import Denied, Task
from portcullis_client.mcp import raise_for_denial


async def run(gateway: str, task: Task, mode: str) -> None:
    # task.auth is an httpx2.Auth: the SDK's own client factory takes it.
    async with create_mcp_http_client(auth=task.auth) as http:
        transport = streamable_http_client(f"{gateway}/mcp", http_client=http)
        async with Client(transport, mode=mode) as client:
            tools = await client.list_tools()
            print(f"[{mode}] tools: {sorted(t.name for t in tools.tools)}")
            result = await client.call_tool("warehouse.connect", {"database": "analytics"})
            print(f"[{mode}] allowed: warehouse.connect -> {raise_for_denial(result).content[0].text}")
            result = await client.call_tool("warehouse.query", {"sql": "select * from customers"})
            try:
                raise_for_denial(result)
                raise SystemExit("the wildcard query was not denied")
            except Denied as e:
                print(f"[{mode}] denied: warehouse.query -> {e.reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateway")
    opts = parser.parse_args()
    with sidecar(opts.gateway) as gateway:
        for mode in ("legacy", "2026-07-28"):
            with Task.start(gateway, AGENT, SECRET, f"MCP SDK example ({mode})") as task:
                asyncio.run(run(gateway, task, mode))
        print("ok")


if __name__ == "__main__":
    main()
