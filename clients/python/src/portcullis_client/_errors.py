"""Typed errors: every denial the gateway answers, with its reason code.

The gateway's error bodies are ``{"error": <reason code>, "detail": ...,
"request_id": ...}`` (``/oauth/token`` answers ``{"error": "invalid_grant",
"reason": <reason code>, ...}``). The reason codes are the stable strings
of the gateway's contract; this module never makes one up: an answer
without a known code is a :class:`GatewayError`.
"""

from __future__ import annotations

import re
from typing import Any, Final

#: The gateway's reason codes (stable strings).
REASONS: Final[frozenset[str]] = frozenset(
    {
        "token_missing",
        "token_invalid",
        "token_expired",
        "token_revoked",
        "wrong_audience",
        "task_mismatch",
        "task_not_active",
        "tool_unknown",
        "tool_not_granted",
        "state_violation",
        "limit_exceeded",
        "rate_limited",
        "args_invalid",
        "policy_forbid",
        "approval_required",
        "anomaly_halt",
        "tool_definition_changed",
        "upstream_unavailable",
        "internal_error",
    }
)

#: Longest ``detail`` kept on an exception, in characters: an error body is
#: data from the network, and a message is printed and logged.
MAX_DETAIL_CHARS: Final = 2000

_ELEVATION = re.compile(r"elevation request ([A-Za-z0-9._:-]{1,128})")


class PortcullisError(Exception):
    """Base of every error this package raises."""


class GatewayError(PortcullisError):
    """The gateway could not be reached, or answered something that is not
    a denial with a reason code (a malformed answer, an unexpected status).
    Nothing was allowed: treat it as a failure, never as a permission."""

    def __init__(self, message: str, *, status: int | None = None, request_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.request_id = request_id


class Denied(PortcullisError):
    """The gateway denied the request; ``reason`` is its reason code."""

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        request_id: str | None = None,
        status: int | None = None,
        policy_ids: list[str] | None = None,
    ):
        detail = detail[:MAX_DETAIL_CHARS]
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.request_id = request_id
        self.status = status
        self.policy_ids: list[str] = list(policy_ids or [])


class ApprovalPending(Denied):
    """The call needs a person's approval (``approval_required``). When the
    gateway held it as an elevation request, ``elevation_id`` names it: ask
    an approver, then call again."""

    def __init__(self, detail: str = "", *, elevation_id: str | None = None, **kw: Any):
        super().__init__("approval_required", detail, **kw)
        self.elevation_id = elevation_id if elevation_id is not None else elevation_in(detail)


class TaskHalted(Denied):
    """The task is halted (``anomaly_halt``): every token of it is revoked
    and only an admin can resume it."""

    def __init__(self, detail: str = "", **kw: Any):
        super().__init__("anomaly_halt", detail, **kw)


def elevation_in(detail: str) -> str | None:
    """The elevation request id named in a denial's detail, if any."""
    m = _ELEVATION.search(detail)
    return m.group(1) if m else None


def denial(
    reason: str,
    detail: str = "",
    *,
    request_id: str | None = None,
    status: int | None = None,
    policy_ids: list[str] | None = None,
    elevation_id: str | None = None,
) -> Denied:
    """The typed exception for a reason code."""
    kw: dict[str, Any] = {"request_id": request_id, "status": status, "policy_ids": policy_ids}
    if reason == "approval_required":
        return ApprovalPending(detail, elevation_id=elevation_id, **kw)
    if reason == "anomaly_halt":
        return TaskHalted(detail, **kw)
    return Denied(reason, detail, **kw)


def from_body(status: int, body: Any) -> PortcullisError:
    """The exception for an error answer of the gateway: its status and its
    decoded JSON body (anything else when it was not JSON)."""
    if not isinstance(body, dict):
        return GatewayError(f"gateway answered {status} without a JSON error body", status=status)
    request_id = _str(body.get("request_id"))
    detail = _str(body.get("detail")) or _str(body.get("error_description")) or ""
    policy_ids = [p for p in body.get("policy_ids") or [] if isinstance(p, str)]
    for key in ("error", "reason"):
        code = body.get(key)
        if isinstance(code, str) and code in REASONS:
            return denial(
                code,
                detail,
                request_id=request_id,
                status=status,
                policy_ids=policy_ids,
                elevation_id=_str(body.get("elevation_id")),
            )
    code = _str(body.get("error")) or "no error code"
    return GatewayError(
        f"gateway answered {status} ({code[:64]}): {detail[:MAX_DETAIL_CHARS]}",
        status=status,
        request_id=request_id,
    )


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) else None
