"""Held approvals (``[approval] hold``): the client's call waits while a
person decides, and gets the tool's result or a typed denial."""

from __future__ import annotations

import threading
import time

import pytest
from gateway import AGENT, SECRET, Gateway

from portcullis_client import ApprovalPending, Task

ARGS = {"table": "staging_customers", "rows": [{"name": "Hopper"}]}


def in_write_state(gateway: Gateway) -> Task:
    task = Task.start(gateway.url, AGENT, SECRET, "held approval test")
    task.transition("query")
    task.transition("write")
    return task


def decide_when_pending(gateway: Gateway, task_id: str, verb: str, seen: list[dict]) -> None:
    """Waits for the task's pending elevation, then approves or denies it."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        r = gateway.admin("GET", "/v1/elevations?status=pending")
        mine = [e for e in r.json().get("elevations", []) if e.get("task_id") == task_id]
        if mine:
            seen.append(mine[0])
            d = gateway.admin("POST", f"/v1/elevations/{mine[0]['id']}/{verb}", json={"note": "checked"})
            assert d.status_code == 200, d.text
            return
        time.sleep(0.1)


def test_a_held_call_completes_with_the_result_once_approved(held_gateway: Gateway) -> None:
    task = in_write_state(held_gateway)
    seen: list[dict] = []
    approver = threading.Thread(
        target=decide_when_pending, args=(held_gateway, task.task_id, "approve", seen)
    )
    approver.start()
    started = time.monotonic()
    result = task.call("warehouse.insert", ARGS)
    approver.join()
    assert seen, "the call was never held for approval"
    assert seen[0]["tool"] == "warehouse.insert"
    assert result is not None
    assert time.monotonic() - started < 15
    task.complete()


def test_a_held_call_that_is_denied_is_approval_pending(held_gateway: Gateway) -> None:
    task = in_write_state(held_gateway)
    seen: list[dict] = []
    approver = threading.Thread(
        target=decide_when_pending, args=(held_gateway, task.task_id, "deny", seen)
    )
    approver.start()
    with pytest.raises(ApprovalPending) as e:
        task.call("warehouse.insert", ARGS)
    approver.join()
    assert seen and e.value.elevation_id == seen[0]["id"], e.value.detail
    assert e.value.reason == "approval_required"
    task.complete()
