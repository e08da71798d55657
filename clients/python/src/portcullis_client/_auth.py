"""``task.auth``: the task's tokens on every request of an ``httpx`` or
``httpx2`` client.

What the flow does for each request:

1. If the access token is due (less than ``refresh_ahead`` of its lifetime
   left, and at least 5 s), it spends the refresh token at
   ``POST /oauth/token`` first (through the task's own client; in an async
   flow on a worker thread, so the event loop runs on) and adopts the new
   pair. Refreshes are serialised across threads and event loops: the
   refresh token is single use, and the gateway revokes the whole task when
   one is presented twice.
2. It attaches ``Authorization: Bearer <access token>`` (or ``DPoP <token>``
   with a fresh proof, when a DPoP signer is configured).
3. If the gateway answers 401 ``token_expired`` (the token ran out in
   flight, or ``refresh_ahead`` is 0), it refreshes once and sends the
   request again; a 401 ``token_revoked`` for a token that has since been
   replaced is sent again with the current one.
4. On a gateway answer that carries rotated tokens it adopts them: the
   ``access_token``/``refresh_token``/``expires_in`` fields that
   ``transition``, ``calls`` and ``authorize`` add on entering a
   ``reverify`` state, and the ``portcullis/access_token``,
   ``portcullis/refresh_token``, ``portcullis/expires_in`` keys of a
   ``tools/call`` result's ``_meta`` on ``/mcp``. Only answers of the
   gateway's own origin are read, and only tokens whose ``task_id`` claim is
   this task's are adopted.

The flow never logs or prints a token.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

import httpx

from ._errors import GatewayError, PortcullisError, from_body

if TYPE_CHECKING:
    from ._task import Task

try:  # The MCP SDK 2.x speaks through httpx2; plug into it when present.
    import httpx2 as _httpx2

    _BASES: tuple[type, ...] = (httpx.Auth, _httpx2.Auth)
except ImportError:  # pragma: no cover - depends on what is installed
    _BASES = (httpx.Auth,)

#: Largest answer body read for rotated tokens, in bytes.
MAX_ROTATION_BODY = 4 * 1024 * 1024
#: Largest token accepted from the gateway, in bytes.
MAX_TOKEN_BYTES = 16 * 1024
#: Shortest refresh margin, in seconds.
MIN_MARGIN = 5.0

META_ACCESS = "portcullis/access_token"
META_REFRESH = "portcullis/refresh_token"
META_EXPIRES = "portcullis/expires_in"


@runtime_checkable
class DPoPSigner(Protocol):
    """Signs DPoP proofs (RFC 9449) for a task's requests.

    ``sign`` returns the compact JWS of one fresh proof: header ``typ:
    dpop+jwt`` with the public ``jwk``; claims ``htm`` (``method``), ``htu``
    (``url`` without query and fragment), ``iat``, a unique ``jti``, and
    ``ath`` (base64url SHA-256 of ``access_token``) when ``access_token``
    is given. Requests then carry ``Authorization: DPoP <token>`` and
    ``DPoP: <proof>``; ``Task.start`` and refreshes carry a proof without
    ``ath``. ``jkt`` is the key's RFC 7638 thumbprint: a task whose
    gateway answers tokens that are not bound (``token_type`` other than
    ``DPoP``) is refused rather than used unbound.
    """

    jkt: str

    def sign(self, method: str, url: str, access_token: str | None) -> str: ...


@dataclass
class _Tokens:
    access: str
    refresh: str | None
    token_type: str
    lifetime: float
    obtained_at: float

    def remaining(self, now: float) -> float:
        return self.obtained_at + self.lifetime - now


def _origin(scheme: str, host: str | None, port: int | None) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(scheme)
    return (scheme.lower(), (host or "").lower(), port if port is not None else default)


def claims_of(token: str) -> dict[str, Any]:
    """The (unverified) claims of a JWT: only to read this task's id back,
    never to trust anything; the gateway verifies every token."""
    try:
        payload = token.split(".")[1]
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


class TaskAuth(*_BASES):  # type: ignore[misc]
    """An ``httpx.Auth`` (and ``httpx2.Auth``, when installed) holding one
    task's tokens. Get it as ``task.auth``; pass it as ``auth=`` to a client
    or to an MCP SDK client factory."""

    def __init__(
        self,
        task: Task,
        *,
        clock: Callable[[], float] = time.monotonic,
        refresh_ahead: float = 0.2,
        dpop: DPoPSigner | None = None,
    ) -> None:
        if not 0.0 <= refresh_ahead < 1.0:
            raise ValueError("refresh_ahead must be in [0, 1)")
        self._task = task
        self._clock = clock
        self._refresh_ahead = refresh_ahead
        self._dpop = dpop
        self._state = threading.Lock()  # guards _tokens; held only briefly
        self._sync_refresh = threading.Lock()  # held while a refresh is in flight
        self._tokens: _Tokens | None = None
        origin = urlsplit(task.gateway)
        self._origin = _origin(origin.scheme, origin.hostname, origin.port)
        self._base_path = origin.path.rstrip("/")

    def __repr__(self) -> str:
        return f"TaskAuth(task_id={self._task.task_id!r})"

    # -- token state -------------------------------------------------------

    def adopt(
        self, access: Any, refresh: Any, expires_in: Any, token_type: Any = "Bearer"
    ) -> bool:
        """Takes a new token pair after checking its shape and that it is
        this task's; returns whether it was adopted."""
        if not isinstance(access, str) or not 0 < len(access) <= MAX_TOKEN_BYTES:
            return False
        if refresh is not None and (
            not isinstance(refresh, str) or not 0 < len(refresh) <= MAX_TOKEN_BYTES
        ):
            return False
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)):
            return False
        if expires_in <= 0 or not isinstance(token_type, str):
            return False
        task_id = self._task.task_id
        if task_id is not None and claims_of(access).get("task_id") != task_id:
            return False
        if self._dpop is not None and token_type.lower() != "dpop":
            raise GatewayError(
                "a DPoP signer is configured but the gateway answered an unbound "
                f"{token_type[:16]!r} token; refusing to use it"
            )
        with self._state:
            self._tokens = _Tokens(
                access=access,
                refresh=refresh,
                token_type="DPoP" if self._dpop is not None else "Bearer",
                lifetime=float(expires_in),
                obtained_at=self._clock(),
            )
        return True

    @property
    def access_token(self) -> str | None:
        with self._state:
            return self._tokens.access if self._tokens else None

    def _due(self) -> bool:
        with self._state:
            t = self._tokens
            if t is None or t.refresh is None:
                return False
            margin = max(MIN_MARGIN, t.lifetime * self._refresh_ahead)
            if self._refresh_ahead == 0.0:
                margin = 0.0
            return t.remaining(self._clock()) <= margin

    def _current(self) -> _Tokens | None:
        with self._state:
            return self._tokens

    # -- requests ----------------------------------------------------------

    def _is_gateway(self, url: Any) -> bool:
        return _origin(url.scheme, url.host, url.port) == self._origin

    def _apply(self, request: Any, tokens: _Tokens | None) -> None:
        if tokens is None:
            return
        request.headers["Authorization"] = f"{tokens.token_type} {tokens.access}"
        if self._dpop is not None:
            url = str(request.url).split("?", 1)[0].split("#", 1)[0]
            request.headers["DPoP"] = self._dpop.sign(request.method, url, tokens.access)

    def _refresh(self, sent: _Tokens | None, expired: bool) -> None:
        """Spends the refresh token of ``sent`` (blocking), unless another
        request already replaced ``sent``, or (when ``expired`` is false) the
        token is no longer due. Serialised across threads and event loops:
        the refresh token is single use.

        It goes through the task's own client, not the caller's: a gateway
        that refused a request with a body before reading it closes that
        connection, and the caller's pool may not have noticed yet."""
        with self._sync_refresh:
            if sent is None or sent.refresh is None or self._current() is not sent:
                return
            if not expired and not self._due():
                return
            url = f"{self._task.gateway}/oauth/token"
            headers = {"Accept": "application/json"}
            if self._dpop is not None:
                headers["DPoP"] = self._dpop.sign("POST", url, None)
            form = {"grant_type": "refresh_token", "refresh_token": sent.refresh}
            try:
                answer = self._task._http.post(url, data=form, headers=headers)
            except httpx.HTTPError as e:
                raise GatewayError(f"could not refresh the token: {type(e).__name__}") from None
            self._take_refresh(sent, answer.status_code, self._json(answer.content))

    def _take_refresh(self, sent: _Tokens, status: int, body: Any) -> None:
        if status != 200 or not isinstance(body, dict):
            raise from_body(status, body)
        if not self.adopt(
            body.get("access_token"),
            body.get("refresh_token"),
            body.get("expires_in"),
            body.get("token_type", "Bearer"),
        ):
            raise GatewayError("the gateway's refresh answer is not a token pair of this task")

    def _expired_answer(self, response: Any, body: Any) -> str | None:
        if response.status_code != 401 or not isinstance(body, dict):
            return None
        code = body.get("error")
        return code if code in ("token_expired", "token_revoked") else None

    def _rotation_in(self, request: Any, response: Any, body: Any) -> None:
        """Adopts rotated tokens from a gateway answer, if it has any."""
        if response.status_code != 200 or not isinstance(body, dict):
            return
        if isinstance(body.get("access_token"), str) and self._rotating_path(request):
            self.adopt(body.get("access_token"), body.get("refresh_token"), body.get("expires_in"))
            return
        result = body.get("result")
        meta = result.get("_meta") if isinstance(result, dict) else None
        if isinstance(meta, dict) and META_ACCESS in meta:
            self.adopt(meta.get(META_ACCESS), meta.get(META_REFRESH), meta.get(META_EXPIRES))

    def _rotating_path(self, request: Any) -> bool:
        path = request.url.path
        if not path.startswith(self._base_path + "/v1/tasks/"):
            return False
        return path.rsplit("/", 1)[-1] in ("transition", "calls", "authorize")

    def _wants_body(self, request: Any, response: Any) -> bool:
        """Whether to read this answer: a 401 (to see whether the token ran
        out), or a 200 to a POST (rotated tokens); JSON of bounded size."""
        if response.status_code == 200:
            if request.method != "POST":
                return False
        elif response.status_code != 401:
            return False
        ctype = response.headers.get("content-type", "")
        if not ctype.startswith("application/json"):
            return False
        length = response.headers.get("content-length")
        return length is None or (length.isdigit() and int(length) <= MAX_ROTATION_BODY)

    @staticmethod
    def _json(content: bytes) -> Any:
        if len(content) > MAX_ROTATION_BODY:
            return None
        try:
            return json.loads(content)
        except ValueError:
            return None

    # -- the flows ---------------------------------------------------------

    def sync_auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        if not self._is_gateway(request.url):
            # Never hand a task token to another origin.
            yield request
            return
        if self._due():
            self._refresh(self._current(), False)
        request.read()
        sent = self._current()
        self._apply(request, sent)
        response = yield request
        if not self._wants_body(request, response):
            return
        response.read()
        body = self._json(response.content)
        expired = self._expired_answer(response, body)
        if expired is not None:
            if expired == "token_expired":
                self._refresh(sent, True)
            if self._current() is sent:
                return  # nothing newer to send it with: the 401 stands
            self._apply(request, self._current())
            response = yield request
            if not self._wants_body(request, response):
                return
            response.read()
            body = self._json(response.content)
        self._rotation_in(request, response, body)

    async def async_auth_flow(self, request: Any) -> AsyncGenerator[Any, Any]:
        if not self._is_gateway(request.url):
            yield request
            return
        import anyio.to_thread

        if self._due():
            await anyio.to_thread.run_sync(self._refresh, self._current(), False)
        await request.aread()
        sent = self._current()
        self._apply(request, sent)
        response = yield request
        if not self._wants_body(request, response):
            return
        await response.aread()
        body = self._json(response.content)
        expired = self._expired_answer(response, body)
        if expired is not None:
            if expired == "token_expired":
                await anyio.to_thread.run_sync(self._refresh, sent, True)
            if self._current() is sent:
                return
            self._apply(request, self._current())
            response = yield request
            if not self._wants_body(request, response):
                return
            await response.aread()
            body = self._json(response.content)
        self._rotation_in(request, response, body)


__all__ = ["DPoPSigner", "PortcullisError", "TaskAuth", "claims_of"]
