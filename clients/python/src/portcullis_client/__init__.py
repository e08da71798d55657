"""Portcullis for agent runtimes: tasks whose tokens stay fresh on every
request, and typed denials.

::

    from portcullis_client import Task, Denied

    with Task.start("http://127.0.0.1:8787", "helper-bot", secret, "summarise the report") as task:
        with httpx.Client(auth=task.auth) as http:   # or httpx2, for the MCP SDK 2.x
            ...
"""

from ._auth import DPoPSigner, TaskAuth
from ._errors import (
    REASONS,
    ApprovalPending,
    Denied,
    GatewayError,
    PortcullisError,
    TaskHalted,
)
from ._task import Elevation, Task

__all__ = [
    "REASONS",
    "ApprovalPending",
    "DPoPSigner",
    "Denied",
    "Elevation",
    "GatewayError",
    "PortcullisError",
    "Task",
    "TaskAuth",
    "TaskHalted",
]
__version__ = "0.1.0"
