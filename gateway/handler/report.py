"""What the handler tells the application: state changes, receipts, undelivered records, and metrics.

:class:`Publisher` fans each change out to the ``last`` property, the async iterators and the hook, and
counts outcomes; it never waits, so the driver can publish from anywhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.errors import IoTHubError
from gateway.handler.machine import State
from gateway.transport import Message

__all__ = ["Publisher", "Receipt", "StateChange", "Undelivered"]

log = logging.getLogger("gateway.handler")


@dataclass(frozen=True, slots=True)
class StateChange:
    """One transition, with why: the code and the error that caused it.

    ``at`` and ``until`` are epoch seconds (for people, logs and dashboards), converted from the handler's
    monotonic clock when the change is made; the handler itself never waits on them.
    """

    state: State
    at: float
    code: int | None = None
    cause: IoTHubError | None = None
    until: float | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Receipt:
    """A delivered operation. ``possible_duplicate``: an earlier attempt may have been delivered too."""

    id: str
    attempts: int
    possible_duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Undelivered:
    """An operation that ended without a confirmed delivery, for the app to persist or replay.

    ``outcome`` is ``"failed"`` (the hub refused it for good, or the handler stopped), ``"expired"`` (its
    deadline passed first; held items for an offline device expire with DeviceNotOnline, because they
    were never sent) or ``"unknown"`` (an attempt may have been delivered: OperationTimedOut).
    """

    kind: str
    id: str
    device_id: str | None
    outcome: str
    error: IoTHubError
    message: Message | None = None
    payload: Any = None



class Publisher:
    """State changes to the property, the iterators and the hook; outcome counters for metrics."""

    def __init__(self, transport_name: str, first: StateChange,
                 hook: Callable[[StateChange], None] | None = None) -> None:
        self.transport_name = transport_name
        self.last = first
        self.hook = hook
        self.subscribers: list[asyncio.Queue[StateChange | None]] = []
        self.counters: Counter[tuple[int | None, str, str]] = Counter()

    def publish(self, change: StateChange) -> None:
        self.last = change
        self.count(change.code, f"state:{change.state.value}")
        for queue in self.subscribers:
            queue.put_nowait(change)
        if self.hook is not None:
            try:
                self.hook(change)
            except Exception:
                log.exception("on_state_change hook raised")

    def count(self, code: int | None, outcome: str) -> None:
        self.counters[(code, self.transport_name, outcome)] += 1

    def end(self) -> None:
        """The handler is closed: every iterator ends."""
        for queue in self.subscribers:
            queue.put_nowait(None)

    def metrics(self) -> dict[tuple[int | None, str, str], int]:
        return dict(self.counters)

