"""Refresh across a real expiry: the gateway's shortest access token
lifetime is one minute, so this waits a little over one minute (once, for
every case)."""

from __future__ import annotations

import asyncio
import time

import httpx
import httpx2
from gateway import AGENT, SECRET, Gateway

from portcullis_client import Task


def test_tokens_are_refreshed_across_an_expiry(gateway: Gateway) -> None:
    # Ahead of time (the default: when a fifth of the lifetime is left), on
    # a sync httpx client; and, on an async httpx2 client, when the gateway
    # answers token_expired: refresh_ahead=0 and a clock that stands still,
    # as a client whose clock lags would see it.
    ahead = Task.start(gateway.url, AGENT, SECRET, "refresh ahead")
    late = Task.start(
        gateway.url, AGENT, SECRET, "refresh when expired", refresh_ahead=0, clock=lambda: 0.0
    )
    started = time.monotonic()
    tokens = {t.task_id: t.access_token for t in (ahead, late)}
    with ahead, late:
        time.sleep(max(0.0, 62 - (time.monotonic() - started)))
        for t in (ahead, late):
            old = tokens[t.task_id]
            assert old is not None
            r = httpx.get(
                f"{gateway.url}/v1/tasks/{t.task_id}",
                headers={"Authorization": f"Bearer {old}"},
                timeout=10,
            )
            assert r.status_code == 401 and r.json()["error"] == "token_expired", r.text

        with httpx.Client(auth=ahead.auth) as http:
            r = http.get(f"{gateway.url}/v1/tasks/{ahead.task_id}")
            assert r.status_code == 200, r.text
        assert ahead.access_token != tokens[ahead.task_id]

        async def late_call() -> httpx2.Response:
            async with httpx2.AsyncClient(auth=late.auth) as http:
                return await http.post(
                    f"{gateway.url}/v1/tasks/{late.task_id}/calls",
                    json={"tool": "warehouse.echo", "arguments": {"text": "still here"}},
                )

        r2 = asyncio.run(late_call())
        assert r2.status_code == 200, r2.text
        assert r2.json()["decision"] == "allow"
        assert late.access_token != tokens[late.task_id]
        # The refreshed tokens keep working for the task's own requests.
        assert ahead.status()["status"] == "active"
        assert late.status()["status"] == "active"
