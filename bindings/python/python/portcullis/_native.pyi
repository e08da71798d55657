from collections.abc import Callable
from os import PathLike
from types import TracebackType
from typing import Any

class Gateway:
    """An embedded gateway: a configuration, its engine and its ledger."""

    @staticmethod
    def open(path: str | PathLike[str]) -> Gateway:
        """Loads and checks the configuration at ``path`` and opens the
        embedded ledger of its ``store.url`` (``sqlite://`` only). Raises
        ``ConfigError`` or ``LedgerError``."""
    @staticmethod
    def load(path: str | PathLike[str]) -> Gateway:
        """Loads and checks the configuration without a ledger: decisions
        in memory, nothing recorded (for tests and measurement)."""
    def start_task(self, agent_id: str, *, goal: str, tools: list[str] | None = None) -> Task:
        """Starts a task (recorded); ``tools`` narrows it to part of the
        agent's allowlist. Raises ``Denied``."""
    def close(self) -> None:
        """Makes every queued record durable and closes the ledger."""
    def __enter__(self) -> Gateway: ...
    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

class Task:
    """A task of an embedded gateway."""

    @property
    def task_id(self) -> str: ...
    @property
    def agent_id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def status(self) -> str: ...
    def call(
        self,
        tool: str,
        args: dict[str, Any] | None = None,
        *,
        invoke: Callable[[dict[str, Any]], Any],
    ) -> Any:
        """Decides the call, makes its write-ahead record durable, runs
        ``invoke(args)`` only if allowed, records the outcome and returns
        ``invoke``'s result. Raises ``Denied`` (the tool did not run) or
        whatever ``invoke`` raised (recorded as an error)."""
    def authorize(self, tool: str, args: dict[str, Any] | None = None) -> None:
        """Decides and records the call without running anything; raises
        ``Denied`` when it is not allowed."""
    def transition(self, to: str) -> tuple[str, str, bool]:
        """Moves the task to state ``to``: ``(from, to, reverify)``."""
    def complete(self) -> None:
        """Ends the task; later calls are denied ``task_not_active``."""
