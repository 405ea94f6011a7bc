"""The fault plan: one script of failures, shared by the HTTP, MQTT and AMQP fronts.

An entry says "for device d, on operation o (over transport t, or any), answer code c n times, then
succeed", or drop the connection, delay or withhold the acknowledgement. Fronts ask ``take()`` before
they answer; each match uses up one of the entry's ``times``. The plan is thread-safe because the AMQP
front answers from proton's thread.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.codes import lookup

__all__ = ["Fault", "FaultKind", "FaultPlan", "Operation"]


class Operation(enum.StrEnum):
    CONNECT = "connect"
    TELEMETRY = "telemetry"
    TWIN_GET = "twin_get"
    TWIN_PATCH = "twin_patch"
    METHOD = "method"  # a direct method call aimed at the device (service side)
    C2D_RECEIVE = "c2d_receive"
    C2D_SETTLE = "c2d_settle"
    ANY = "any"


class FaultKind(enum.StrEnum):
    ERROR = "error"  #: answer with ``code`` in the transport's wire form
    DROP = "drop"  #: close the socket without a word
    NO_ACK = "no_ack"  #: accept the operation but never acknowledge it
    DELAY = "delay"  #: answer normally after ``delay`` seconds


@dataclass
class Fault:
    operation: Operation
    kind: FaultKind = FaultKind.ERROR
    code: int | None = None
    device: str | None = None  #: None matches every device
    transport: str | None = None  #: None matches every front
    times: int | None = 1  #: None: for ever (until removed)
    retry_after: float | None = None
    delay: float = 0.0
    form: str | None = None  #: a front's wire-form hint, e.g. the HTTP body form ("legacy", "nested", ...)
    hits: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.operation = Operation(self.operation)
        self.kind = FaultKind(self.kind)
        if self.kind is FaultKind.ERROR:
            if self.code is None:
                raise ValueError("an error fault needs a code")
            self.code = lookup(self.code).code
        if self.times is not None and self.times < 1:
            raise ValueError(f"times must be at least 1, not {self.times!r}")
        if self.transport not in (None, "http", "mqtt", "amqp"):
            raise ValueError(f"unknown transport {self.transport!r}")
        if self.delay < 0 or (self.retry_after is not None and self.retry_after < 0):
            raise ValueError("delays must not be negative")

    def matches(self, device: str, operation: Operation, transport: str) -> bool:
        return (
            (self.device is None or self.device == device)
            and (self.operation in (Operation.ANY, operation))
            and (self.transport is None or self.transport == transport)
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        allowed = {"operation", "kind", "code", "device", "transport", "times", "retry_after", "delay", "form"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation.value,
            "kind": self.kind.value,
            "code": self.code,
            "device": self.device,
            "transport": self.transport,
            "times": self.times,
            "retry_after": self.retry_after,
            "delay": self.delay,
            "form": self.form,
            "hits": self.hits,
        }


class FaultPlan:
    """An ordered list of faults; the first entry that matches answers."""

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = list(faults)

    def add(self, operation: Operation | str, code: int | None = None, **kwargs: Any) -> Fault:
        fault = Fault(Operation(operation), code=code, **kwargs)
        with self._lock:
            self._faults.append(fault)
        return fault

    def take(self, device: str, operation: Operation, transport: str) -> Fault | None:
        """The fault to apply now (using up one of its times), or None to answer normally."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(device, operation, transport):
                    fault.hits += 1
                    if fault.times is not None and fault.hits >= fault.times:
                        self._faults.remove(fault)
                    return fault
        return None

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)
