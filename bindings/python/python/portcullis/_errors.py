"""The errors of the embedded gateway. A denial carries the reason code of
the gateway's contract (the same strings the service answers)."""

from __future__ import annotations


class PortcullisError(Exception):
    """Base of every error this package raises."""


class ConfigError(PortcullisError):
    """The configuration has problems (one finding per line)."""


class LedgerError(PortcullisError):
    """The embedded ledger could not be opened."""


class Denied(PortcullisError):
    """The call was denied; the tool did not run. ``reason`` is the reason
    code, ``policy_ids`` the Cedar policies that decided."""

    def __init__(self, reason: str, detail: str = "", policy_ids: list[str] | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.policy_ids: list[str] = list(policy_ids or [])


class ApprovalPending(Denied):
    """The call needs a person's approval (``approval_required``). The
    embedded shape has no approvers: run the sidecar for held approvals.
    ``elevation_id`` is always ``None`` here."""

    def __init__(self, detail: str = "", policy_ids: list[str] | None = None):
        super().__init__("approval_required", detail, policy_ids)
        self.elevation_id: str | None = None


class TaskHalted(Denied):
    """A rule halted the task (``anomaly_halt``); its later calls are
    denied."""

    def __init__(self, detail: str = "", policy_ids: list[str] | None = None):
        super().__init__("anomaly_halt", detail, policy_ids)


def denial(reason: str, detail: str, policy_ids: list[str]) -> Denied:
    """The typed exception of a denial (called by the native module)."""
    if reason == "approval_required":
        return ApprovalPending(detail, policy_ids)
    if reason == "anomaly_halt":
        return TaskHalted(detail, policy_ids)
    return Denied(reason, detail, policy_ids)
