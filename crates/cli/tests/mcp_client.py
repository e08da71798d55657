"""A real MCP client (the `mcp` Python SDK, 2.x) driven by `tests/mcp_real.rs`.

    PORTCULLIS_MCP_TOKEN=<task token> python3 mcp_client.py URL MODE STEPS_JSON

MODE is the SDK's `Client(mode=...)`: "legacy" (the initialize handshake,
2025-11-25 sessions) or a modern version such as "2026-07-28" (stateless).
STEPS_JSON is a list of steps, each `{"op": "list"}` or
`{"op": "call", "name": ..., "arguments": {...}}`. The answer, on stdout, is
one JSON list with one entry per step:

- list: `{"tools": [names]}`
- call: `{"result": <CallToolResult as JSON>}`, or
  `{"error": {"code", "message", "data"}}` when the call raised `MCPError`.

The token travels as an `Authorization: Bearer` header on every HTTP request,
through the httpx client the SDK's Streamable HTTP transport is given.
"""

import asyncio
import json
import os
import sys

from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError


def dump(model):
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


async def run(url, mode, steps):
    token = os.environ["PORTCULLIS_MCP_TOKEN"]
    out = []
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
        transport = streamable_http_client(url, http_client=http)
        # No client-side response cache: every list must reach the gateway.
        async with Client(transport, mode=mode, cache=None) as client:
            for step in steps:
                if step["op"] == "list":
                    listed = await client.list_tools()
                    out.append({"tools": [t.name for t in listed.tools]})
                elif step["op"] == "call":
                    try:
                        result = await client.call_tool(step["name"], step.get("arguments", {}))
                        out.append({"result": dump(result)})
                    except MCPError as e:
                        out.append(
                            {
                                "error": {
                                    "code": e.error.code,
                                    "message": e.error.message,
                                    "data": e.error.data,
                                }
                            }
                        )
                else:
                    raise ValueError(f"unknown step {step!r}")
    return out


def main():
    url, mode, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    print(json.dumps(asyncio.run(run(url, mode, steps))))


if __name__ == "__main__":
    main()
