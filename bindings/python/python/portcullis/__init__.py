"""Portcullis embedded in Python.

Every tool call is decided in-process by the planner the service uses, its
write-ahead record made durable in the embedded SQLite ledger (the hash
chain that ``portcullis audit verify`` checks), and the tool runs only if
allowed::

    import portcullis

    with portcullis.Gateway.open("portcullis.toml") as gw:
        task = gw.start_task("ingest-bot", goal="nightly load")
        rows = task.call("warehouse.query", {"sql": "select 1"}, invoke=run_query)

A denial raises :class:`Denied` (or :class:`ApprovalPending`,
:class:`TaskHalted`) with the reason code.
"""

from ._errors import (
    ApprovalPending,
    ConfigError,
    Denied,
    LedgerError,
    PortcullisError,
    TaskHalted,
)
from ._native import Gateway, Task

__all__ = [
    "ApprovalPending",
    "ConfigError",
    "Denied",
    "Gateway",
    "LedgerError",
    "PortcullisError",
    "Task",
    "TaskHalted",
]
__version__ = "0.1.0"
