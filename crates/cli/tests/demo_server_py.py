"""Talks to `portcullis demo-server` with the official MCP Python SDK.

Usage: demo_server_py.py BINARY HTTP_URL

Over stdio (the SDK spawns BINARY) and over Streamable HTTP (HTTP_URL, a
server the caller started), in the handshake era (mode="legacy"), the
stateless era (mode="2026-07-28") and with era detection (mode="auto"):
list the tools, call `echo`, and run a `query`. Prints one line per check
and exits non-zero on the first failure.
"""

import sys

import anyio
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters

EXPECTED = {"connect", "query", "validate", "transform", "insert", "echo"}


async def exercise(label, server, mode):
    async with Client(server, mode=mode) as client:
        tools = await client.list_tools()
        names = {t.name for t in tools.tools}
        assert names == EXPECTED, f"{label}: tools {names}"

        echo = await client.call_tool("echo", {"text": f"hello {label}"})
        assert not echo.is_error, f"{label}: echo failed: {echo}"
        assert echo.content[0].text == f"hello {label}", f"{label}: echo {echo}"

        query = await client.call_tool(
            "query", {"sql": "SELECT count(*) AS n FROM customers", "limit": 5}
        )
        assert not query.is_error, f"{label}: query failed: {query}"
        assert query.structured_content["rows"] == [{"n": 20}], f"{label}: {query}"

        refused = await client.call_tool("query", {"sql": "DELETE FROM customers"})
        assert refused.is_error, f"{label}: a DELETE through query was not refused"

        print(f"ok {label} (protocol {client.protocol_version})", flush=True)


async def main():
    binary, url = sys.argv[1], sys.argv[2]
    stdio = StdioServerParameters(command=binary, args=["demo-server", "warehouse"])
    for mode in ("legacy", "2026-07-28", "auto"):
        await exercise(f"stdio/{mode}", stdio, mode)
        await exercise(f"http/{mode}", url, mode)


if __name__ == "__main__":
    anyio.run(main)
