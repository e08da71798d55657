"""``task.auth`` on the official MCP SDK's Streamable HTTP client (2.x,
over httpx2), in both protocol eras, against a real ``portcullis serve``."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import httpx2
import pytest
from gateway import AGENT, SECRET, Gateway
from mcp.client.client import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from portcullis_client import Denied, Task
from portcullis_client.mcp import raise_for_denial

ERAS = ["legacy", "2026-07-28"]


async def session(gateway: Gateway, task: Task, mode: str, steps: Any) -> Any:
    # The SDK's own client factory, given task.auth: what an application
    # passes as `httpx_client_factory`/`http_client`.
    async with create_mcp_http_client(auth=task.auth) as http:
        transport = streamable_http_client(f"{gateway.url}/mcp", http_client=http)
        async with Client(transport, mode=mode, cache=None) as client:
            return await steps(client)


@pytest.mark.parametrize("mode", ERAS)
def test_mcp_sdk_calls_tools_and_denials_are_typed(gateway: Gateway, mode: str) -> None:
    with Task.start(gateway.url, AGENT, SECRET, f"mcp {mode}") as task:

        async def steps(client: Client) -> None:
            listed = await client.list_tools()
            assert "warehouse.connect" in {t.name for t in listed.tools}
            ok = await client.call_tool("warehouse.connect", {"database": "analytics"})
            assert raise_for_denial(ok) is ok and not ok.is_error
            denied = await client.call_tool("warehouse.query", {"sql": "select * from orders"})
            with pytest.raises(Denied) as e:
                raise_for_denial(denied)
            assert e.value.reason == "policy_forbid"
            # A tool outside the allowlist stays "Unknown tool".
            with pytest.raises(MCPError) as unknown:
                await client.call_tool("warehouse.drop_everything", {})
            assert (unknown.value.error.data or {}).get("reason") == "tool_unknown"

        asyncio.run(session(gateway, task, mode, steps))


@pytest.mark.parametrize("mode", ERAS)
def test_mcp_rotation_on_reverify_is_adopted(gateway: Gateway, mode: str) -> None:
    with Task.start(gateway.url, AGENT, SECRET, f"mcp rotation {mode}") as task:
        first = task.access_token

        async def steps(client: Client) -> None:
            await client.call_tool("warehouse.connect", {"database": "analytics"})
            await client.call_tool("warehouse.query", {"sql": "select 1"})
            assert task.access_token == first
            # Entering the reverify state rotates the task's tokens; the
            # new pair rides in the result's _meta and task.auth takes it.
            moved = await client.call_tool(
                "warehouse.validate", {"table": "staging_customers", "rows": [{"name": "Ada"}]}
            )
            assert not moved.is_error, moved
            assert task.access_token != first
            # The next requests go out with the new token (the old one is revoked).
            again = await client.call_tool("warehouse.echo", {"text": "after rotation"})
            assert not again.is_error, again

        asyncio.run(session(gateway, task, mode, steps))
        assert first is not None
        r = httpx.get(
            f"{gateway.url}/v1/tasks/{task.task_id}",
            headers={"Authorization": f"Bearer {first}"},
            timeout=10,
        )
        assert r.status_code == 401 and r.json()["error"] == "token_revoked"
        assert task.status()["state"] == "write"


def test_task_auth_is_an_httpx2_auth(gateway: Gateway) -> None:
    with Task.start(gateway.url, AGENT, SECRET, "httpx2") as task:
        assert isinstance(task.auth, httpx2.Auth) and isinstance(task.auth, httpx.Auth)
        with httpx2.Client(auth=task.auth) as http:
            r = http.get(f"{gateway.url}/v1/tasks/{task.task_id}")
            assert r.status_code == 200 and r.json()["task_id"] == task.task_id
