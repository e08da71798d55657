"""Helpers for MCP clients talking to the gateway's ``/mcp`` endpoint.

The MCP SDK 2.x speaks through ``httpx2``; ``task.auth`` is an
``httpx2.Auth`` too, so it goes on the client as it is::

    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    async with httpx2.AsyncClient(auth=task.auth) as http:
        async with streamable_http_client(f"{gateway}/mcp", http_client=http) as (r, w, *_):
            ...

A denial of a ``tools/call`` comes back as a result with ``isError`` and
``_meta["portcullis/reason"]`` (a tool outside the agent's allowlist is the
JSON-RPC error ``Unknown tool``); :func:`raise_for_denial` turns the first
into the typed exceptions of this package.
"""

from __future__ import annotations

from typing import Any

from ._errors import REASONS, denial

META_REASON = "portcullis/reason"


def _get(obj: Any, *names: str) -> Any:
    for name in names:
        if isinstance(obj, dict) and name in obj:
            return obj[name]
        if hasattr(obj, name):
            return getattr(obj, name)
    return None


def raise_for_denial(result: Any) -> Any:
    """Returns ``result`` (a ``CallToolResult`` or its JSON) unless it is a
    gateway denial, which raises :class:`~portcullis_client.Denied`,
    :class:`~portcullis_client.ApprovalPending` or
    :class:`~portcullis_client.TaskHalted`."""
    if not _get(result, "isError", "is_error"):
        return result
    meta = _get(result, "_meta", "meta")
    reason = meta.get(META_REASON) if isinstance(meta, dict) else None
    if not isinstance(reason, str) or reason not in REASONS:
        return result  # the tool's own error, not the gateway's
    text = ""
    for block in _get(result, "content") or []:
        t = _get(block, "text")
        if isinstance(t, str):
            text = t
            break
    prefix = f"denied: {reason}: "
    detail = text[len(prefix) :] if text.startswith(prefix) else text
    raise denial(reason, detail)
