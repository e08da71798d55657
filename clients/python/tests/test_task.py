"""The client against a real ``portcullis serve`` over its REST surface."""

from __future__ import annotations

import httpx
import pytest
from gateway import AGENT, SECRET, Gateway

from portcullis_client import ApprovalPending, Denied, GatewayError, Task, TaskHalted


def start(gateway: Gateway, **kw: object) -> Task:
    return Task.start(gateway.url, AGENT, SECRET, "python client test", **kw)  # type: ignore[arg-type]


def raw_status(gateway: Gateway, task: Task, token: str) -> httpx.Response:
    return httpx.get(
        f"{gateway.url}/v1/tasks/{task.task_id}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def test_start_gives_a_task_with_a_token_and_status(gateway: Gateway) -> None:
    with start(gateway, tools=["warehouse.connect", "warehouse.echo"]) as task:
        assert task.task_id and task.state == "connect"
        assert task.tools == ["warehouse.connect", "warehouse.echo"]
        view = task.status()
        assert view["status"] == "active" and view["agent_id"] == AGENT
        assert task.call("warehouse.echo", {"text": "hi"}) is not None
        # No token in what is printed.
        assert task.access_token is not None and task.access_token not in repr(task)
        assert task.access_token not in repr(task.auth)


def test_a_wrong_secret_is_a_typed_denial(gateway: Gateway) -> None:
    with pytest.raises(Denied) as e:
        Task.start(gateway.url, AGENT, "not-the-secret", "x")
    assert e.value.reason == "token_invalid"
    assert e.value.status == 401
    assert e.value.request_id


def test_a_denial_surfaces_as_denied_with_reason_and_request_id(gateway: Gateway) -> None:
    with start(gateway) as task:
        task.call("warehouse.connect", {"database": "analytics"})
        assert task.state == "connect"
        with pytest.raises(Denied) as e:
            task.call("warehouse.query", {"sql": "select * from customers"})
        assert type(e.value) is Denied
        assert e.value.reason == "policy_forbid"
        assert e.value.policy_ids == ["no-sql-wildcards"]
        assert e.value.status == 403 and e.value.request_id
        with pytest.raises(Denied) as e:
            task.authorize("warehouse.query", {"sql": "select * from orders"})
        assert e.value.reason == "policy_forbid"
        # A tool the task was not granted.
        with start(gateway, tools=["warehouse.connect"]) as narrow:
            with pytest.raises(Denied) as e:
                narrow.call("warehouse.echo", {"text": "x"})
            assert e.value.reason == "tool_not_granted"


def test_completion_revokes_the_token(gateway: Gateway) -> None:
    task = start(gateway)
    token = task.access_token
    assert token is not None
    assert raw_status(gateway, task, token).status_code == 200
    task.complete()
    r = raw_status(gateway, task, token)
    assert r.status_code == 401 and r.json()["error"] == "token_revoked"
    with pytest.raises(Denied) as e:
        task.status()
    assert e.value.reason == "token_revoked" and e.value.status == 401
    # Completing again through the context manager is quiet.
    with task:
        pass


def test_a_reverify_transition_rotates_the_tokens(gateway: Gateway) -> None:
    with start(gateway) as task:
        task.transition("query")
        before = task.access_token
        moved = task.transition("write")
        assert moved["state"] == "write" and moved["reverify"] is True
        assert "access_token" not in moved
        after = task.access_token
        assert after is not None and after != before
        # The old token is revoked; the adopted one works, through the
        # task's own requests and through any httpx client with task.auth.
        assert before is not None
        r = raw_status(gateway, task, before)
        assert r.status_code == 401 and r.json()["error"] == "token_revoked"
        assert task.status()["state"] == "write"
        with httpx.Client(auth=task.auth) as http:
            assert http.get(f"{gateway.url}/v1/tasks/{task.task_id}").status_code == 200


def test_rotation_on_an_auto_advancing_call_is_adopted(gateway: Gateway) -> None:
    with start(gateway) as task:
        task.call("warehouse.connect", {"database": "analytics"})
        task.call("warehouse.query", {"sql": "select 1"})
        before = task.access_token
        task.call("warehouse.validate", {"table": "staging_customers", "rows": [{"name": "Ada"}]})
        assert task.state == "write"
        assert task.access_token != before
        assert task.status()["state"] == "write"


def test_a_call_that_needs_approval_is_approval_pending(gateway: Gateway) -> None:
    with start(gateway) as task:
        task.transition("query")
        task.transition("write")
        args = {"table": "staging_customers", "rows": [{"name": "Grace"}]}
        with pytest.raises(ApprovalPending) as e:
            task.call("warehouse.insert", args)
        assert e.value.reason == "approval_required" and isinstance(e.value, Denied)
        assert e.value.elevation_id, e.value.detail
        r = gateway.admin("POST", f"/v1/elevations/{e.value.elevation_id}/approve", json={})
        assert r.status_code == 200, r.text
        assert task.call("warehouse.insert", args) is not None


def test_an_elevation_request_has_an_id(gateway: Gateway) -> None:
    with start(gateway, tools=["warehouse.connect"]) as task:
        elevation = task.request_elevation("warehouse.echo", "needs to echo")
        assert elevation.elevation_id and elevation.status == "pending"


def test_a_halted_task_is_task_halted(gateway: Gateway) -> None:
    with start(gateway) as task:
        r = gateway.admin("POST", f"/v1/tasks/{task.task_id}/halt", json={"reason": "test"})
        assert r.status_code == 200, r.text
        with pytest.raises(TaskHalted) as e:
            task.status()
        assert e.value.reason == "anomaly_halt"


def test_the_token_never_goes_to_another_origin(gateway: Gateway) -> None:
    seen: list[httpx.Request] = []

    def elsewhere(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"access_token": "x", "expires_in": 60})

    with start(gateway) as task:
        token = task.access_token
        with httpx.Client(auth=task.auth, transport=httpx.MockTransport(elsewhere)) as http:
            http.post("http://other.example/v1/tasks/x/transition", json={})
        assert "authorization" not in seen[0].headers
        assert task.access_token == token


def test_plain_http_to_a_remote_gateway_is_refused() -> None:
    with pytest.raises(ValueError):
        Task.start("http://gateway.example", AGENT, SECRET, "x")


def test_an_unreachable_gateway_is_a_gateway_error() -> None:
    with pytest.raises(GatewayError):
        Task.start("http://127.0.0.1:9", AGENT, SECRET, "x")
