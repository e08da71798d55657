"""A task of the gateway, as an agent runtime holds it."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from ._auth import DPoPSigner, TaskAuth
from ._errors import Denied, GatewayError, PortcullisError, denial, from_body

#: Longest goal the gateway accepts, in bytes (checked here first).
MAX_GOAL_BYTES = 4096
#: Default timeout of the task's own requests, in seconds.
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True)
class Elevation:
    """An elevation request: a tool asked for outside the task's grant."""

    elevation_id: str
    status: str


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_gateway(gateway: str, allow_insecure_http: bool) -> str:
    parts = urlsplit(gateway)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("gateway must be an http(s) URL, e.g. https://gateway.example")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("gateway URL must not carry a query, a fragment or credentials")
    if parts.scheme == "http" and not (allow_insecure_http or _is_loopback(parts.hostname)):
        # The bootstrap secret and the task tokens would cross the network
        # in the clear.
        raise ValueError(
            "plain http is allowed only to a loopback gateway; use https, or pass "
            "allow_insecure_http=True if something else encrypts the path"
        )
    return gateway.rstrip("/")


def _json_or_raise(response: httpx.Response, *ok: int) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code not in ok:
        raise from_body(response.status_code, body)
    if not isinstance(body, dict):
        raise GatewayError(
            f"gateway answered {response.status_code} without a JSON object",
            status=response.status_code,
        )
    return body


class Task:
    """A task of the gateway: its id, its tokens (kept fresh by
    :attr:`auth`) and its lifecycle (transition, elevations, complete).

    Start one with :meth:`Task.start`. Use it as a context manager to
    complete it (and so revoke every token of it) when the block ends.
    """

    def __init__(
        self,
        gateway: str,
        *,
        http: httpx.Client | None = None,
        clock: Callable[[], float] = time.monotonic,
        refresh_ahead: float = 0.2,
        dpop: DPoPSigner | None = None,
        allow_insecure_http: bool = False,
    ) -> None:
        self.gateway = _check_gateway(gateway, allow_insecure_http)
        self.task_id: str | None = None
        self.state: str | None = None
        self.tools: list[str] = []
        self.auth = TaskAuth(self, clock=clock, refresh_ahead=refresh_ahead, dpop=dpop)
        self._dpop = dpop
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=DEFAULT_TIMEOUT)

    def __repr__(self) -> str:
        return f"Task(task_id={self.task_id!r}, state={self.state!r})"

    @classmethod
    def start(
        cls,
        gateway: str,
        agent_id: str,
        secret: str,
        goal: str,
        tools: list[str] | None = None,
        **options: Any,
    ) -> Task:
        """Starts a task for ``agent_id`` with its bootstrap ``secret``.

        ``tools`` asks for the part of the agent's allowlist this task needs
        (least privilege); by default the whole allowlist. ``options``:
        ``http`` (an ``httpx.Client`` for the task's own requests),
        ``clock`` (seconds, monotonic), ``refresh_ahead`` (share of a
        token's lifetime left when it is refreshed; 0 refreshes only when
        the gateway answers ``token_expired``), ``dpop`` (a
        :class:`DPoPSigner`), ``allow_insecure_http``.
        """
        if len(goal.encode()) > MAX_GOAL_BYTES:
            raise ValueError(f"goal longer than {MAX_GOAL_BYTES} bytes")
        task = cls(gateway, **options)
        body: dict[str, Any] = {"agent_id": agent_id, "goal": goal}
        if tools is not None:
            body["tools"] = list(tools)
        url = f"{task.gateway}/v1/tasks"
        headers = {"Authorization": f"Bearer {secret}"}
        if task._dpop is not None:
            headers["DPoP"] = task._dpop.sign("POST", url, None)
        try:
            try:
                response = task._http.post(url, json=body, headers=headers)
            except httpx.HTTPError as e:
                raise GatewayError(f"could not reach the gateway: {type(e).__name__}") from None
            started = _json_or_raise(response, 201)
            task_id = started.get("task_id")
            if not isinstance(task_id, str):
                raise GatewayError("the gateway's answer has no task_id", status=201)
            task.task_id = task_id
            task.state = started.get("state")
            task.tools = [t for t in started.get("tools") or [] if isinstance(t, str)]
            if not task.auth.adopt(
                started.get("access_token"),
                started.get("refresh_token"),
                started.get("expires_in"),
                started.get("token_type", "Bearer"),
            ):
                raise GatewayError("the gateway's answer holds no token of this task", status=201)
        except BaseException:
            task.close()
            raise
        return task

    # -- what the runtime reads ---------------------------------------------

    @property
    def access_token(self) -> str | None:
        """The current access token (for a framework that can only take a
        static header; prefer :attr:`auth`, which keeps it fresh)."""
        return self.auth.access_token

    def headers(self) -> dict[str, str]:
        """``{"Authorization": "Bearer <current token>"}``: a snapshot for
        frameworks that take static headers. It is not refreshed."""
        token = self.access_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    # -- the lifecycle ----------------------------------------------------

    def _path(self, tail: str) -> str:
        if self.task_id is None:
            raise PortcullisError("the task has not started")
        return f"{self.gateway}/v1/tasks/{quote(self.task_id, safe='')}{tail}"

    def _send(self, method: str, tail: str, *ok: int, json: Any = None) -> Any:
        try:
            response = self._http.request(method, self._path(tail), json=json, auth=self.auth)
        except httpx.HTTPError as e:
            raise GatewayError(f"could not reach the gateway: {type(e).__name__}") from None
        return _json_or_raise(response, *ok)

    def status(self) -> dict[str, Any]:
        """The task as the gateway sees it: ``status``, ``state``, counts."""
        view = self._send("GET", "", 200)
        if isinstance(view.get("state"), str):
            self.state = view["state"]
        return view

    def transition(self, to: str) -> dict[str, Any]:
        """Moves the task to workflow state ``to``. Entering a ``reverify``
        state rotates the tokens; :attr:`auth` adopts the new ones."""
        moved = self._send("POST", "/transition", 200, json={"to": to})
        if isinstance(moved.get("state"), str):
            self.state = moved["state"]
        return {k: v for k, v in moved.items() if k not in ("access_token", "refresh_token")}

    def call(self, tool: str, arguments: dict[str, Any] | None = None) -> Any:
        """Calls ``tool`` through the gateway (``POST …/calls``) and returns
        its result; a denial raises :class:`Denied` (or a subclass)."""
        answer = self._send("POST", "/calls", 200, json={"tool": tool, "arguments": arguments or {}})
        if isinstance(answer.get("state"), str):
            self.state = answer["state"]
        return answer.get("result")

    def authorize(self, tool: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Asks for a decision without making the call (policy-decision
        point): returns the decision when allowed, raises :class:`Denied`
        (or a subclass) when not."""
        answer = self._send(
            "POST", "/authorize", 200, json={"tool": tool, "arguments": arguments or {}}
        )
        if answer.get("decision") != "allow":
            reason = answer.get("reason")
            if not isinstance(reason, str):
                raise GatewayError("a denial without a reason code")
            raise denial(reason, str(answer.get("detail") or ""), policy_ids=answer.get("policy_ids"))
        if isinstance(answer.get("state"), str):
            self.state = answer["state"]
        return {k: v for k, v in answer.items() if k not in ("access_token", "refresh_token")}

    def request_elevation(self, tool: str, reason: str) -> Elevation:
        """Asks an approver for ``tool``, outside the task's grant."""
        answer = self._send("POST", "/elevations", 202, json={"tool": tool, "reason": reason})
        elevation_id = answer.get("elevation_id")
        if not isinstance(elevation_id, str):
            raise GatewayError("the gateway's answer has no elevation_id", status=202)
        return Elevation(elevation_id, str(answer.get("status", "pending")))

    def complete(self) -> dict[str, Any]:
        """Ends the task: the gateway revokes every token of it."""
        return self._send("POST", "/complete", 200)

    def close(self) -> None:
        """Closes the task's own HTTP client (not the task)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Task:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.task_id is not None:
                try:
                    self.complete()
                except Denied as e:
                    # Already ended (completed, halted, expired): nothing to revoke.
                    if e.reason not in ("token_revoked", "task_not_active", "anomaly_halt"):
                        raise
        finally:
            self.close()
