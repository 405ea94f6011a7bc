"""The fault plan: one script of failures, shared by the HTTP, MQTT and AMQP fronts.

An entry says "for device d, on operation o (over transport t, or any), answer code c n times (or for
s seconds), then succeed", or drop the connection, stall it (half-open), delay or withhold the
acknowledgement. Fronts ask ``take()`` before they answer; each match uses up one of the entry's
``times``. The plan is thread-safe because the AMQP front answers from proton's thread.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.codes import by_name, lookup

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
    #: a half-open link: the front stops answering and stops reading that connection for good, but keeps
    #: the socket open, so only the client's own keep-alive or deadline can tell (MQTT and AMQP)
    STALL = "stall"


_TRANSPORTS = (None, "http", "mqtt", "amqp")
_FIELDS = frozenset({"operation", "kind", "code", "device", "transport", "times", "retry_after", "delay", "form",
                     "for_seconds", "match_property", "match_body"})
_OUTPUT_ONLY = frozenset({"id", "hits"})  # to_dict() reports them; a listed fault can be added again as is


@dataclass
class Fault:
    """One scripted failure.

    It ends after ``times`` matches or ``for_seconds`` after its first match, whichever comes first
    (``times=None``: no count limit; with ``for_seconds`` and no ``times``, :meth:`from_dict` and
    :meth:`FaultPlan.add` make it unlimited in count, so "throttle for two minutes" is one entry).
    ``match_property`` / ``match_body`` narrow it to messages that carry those application properties
    / that body substring: a poison message.
    """

    operation: Operation
    kind: FaultKind = FaultKind.ERROR
    code: int | None = None  #: a six-digit code (a catalog name is accepted too)
    device: str | None = None  #: None matches every device
    transport: str | None = None  #: None matches every front
    times: int | None = 1  #: None: for ever (until removed or ``for_seconds`` is over)
    #: HTTP and AMQP only: IoT Hub has no way to say it over MQTT, so ``transport="mqtt"`` refuses it and a
    #: fault for every transport reaches MQTT clients without it
    retry_after: float | None = None
    delay: float = 0.0
    form: str | None = None  #: a front's wire-form hint, e.g. the HTTP body form ("legacy", "nested", ...)
    for_seconds: float | None = None  #: how long it lasts from its first match (the plan's monotonic clock)
    match_property: dict[str, str] | None = None  #: only messages with these application properties
    match_body: str | None = None  #: only messages whose body contains this (UTF-8) text
    hits: int = field(default=0, init=False)
    fault_id: int = field(default=0, init=False)  #: set by the plan, for the admin surface
    started: float | None = field(default=None, init=False)  #: the plan clock at the first match

    def __post_init__(self) -> None:
        self.operation = Operation(self.operation)
        self.kind = FaultKind(self.kind)
        if self.kind is FaultKind.ERROR:
            if self.code is None:
                raise ValueError("an error fault needs a code")
            if isinstance(self.code, str) and not self.code.strip().isdigit():
                info = by_name(self.code)  # a name, e.g. "ThrottlingException"
                if info is None:
                    raise ValueError(f"no code named {self.code!r} in the catalog")
                self.code = info.code
            self.code = lookup(self.code).code
        if self.times is not None and (not isinstance(self.times, int) or self.times < 1):
            raise ValueError(f"times must be at least 1, not {self.times!r}")
        if self.transport not in _TRANSPORTS:
            raise ValueError(f"unknown transport {self.transport!r}")
        if self.delay < 0 or (self.retry_after is not None and self.retry_after < 0):
            raise ValueError("delays must not be negative")
        if self.for_seconds is not None and not self.for_seconds > 0:
            raise ValueError(f"for_seconds must be positive, not {self.for_seconds!r}")
        if self.retry_after is not None and self.transport == "mqtt":
            raise ValueError("retry_after cannot be sent over MQTT: IoT Hub has no way to say it there (its MQTT 5 "
                             "reference has no retry-after), so use transport='http' or 'amqp'")
        if self.kind is FaultKind.STALL and self.transport == "http":
            raise ValueError("a stall is a half-open MQTT or AMQP connection; HTTP has none to stall")
        if self.match_property is not None:
            if not isinstance(self.match_property, Mapping) or not self.match_property:
                raise ValueError("match_property must be a non-empty table of property names to values")
            self.match_property = {str(k): str(v) for k, v in self.match_property.items()}
        if self.match_body is not None and not isinstance(self.match_body, str):
            raise ValueError("match_body must be text")

    def matches(self, device: str, operation: Operation, transport: str,
                properties: Mapping[str, str] | None = None, body: bytes | None = None) -> bool:
        if not (
            (self.device is None or self.device == device)
            and (self.operation in (Operation.ANY, operation))
            and (self.transport is None or self.transport == transport)
        ):
            return False
        if self.match_property is not None:
            props = properties or {}
            if any(props.get(k) != v for k, v in self.match_property.items()):
                return False
        return self.match_body is None or (body is not None and self.match_body.encode() in body)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        unknown = set(data) - _FIELDS - _OUTPUT_ONLY
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        values = {k: v for k, v in data.items() if k not in _OUTPUT_ONLY}  # what to_dict() adds is ignored
        if values.get("for_seconds") is not None and "times" not in values:
            values["times"] = None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.fault_id,
            "operation": self.operation.value,
            "kind": self.kind.value,
            "code": self.code,
            "device": self.device,
            "transport": self.transport,
            "times": self.times,
            "retry_after": self.retry_after,
            "delay": self.delay,
            "form": self.form,
            "for_seconds": self.for_seconds,
            "match_property": self.match_property,
            "match_body": self.match_body,
            "hits": self.hits,
        }


class FaultPlan:
    """An ordered list of faults; the first entry that matches answers.

    ``clock`` is monotonic (``for_seconds`` is a duration, not a date); inject one in tests.
    """

    def __init__(self, faults: Iterable[Fault] = (), *, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._faults: list[Fault] = []
        self.clock = clock
        for fault in faults:
            self.append(fault)

    def append(self, fault: Fault) -> Fault:
        with self._lock:
            fault.fault_id = next(self._ids)
            self._faults.append(fault)
        return fault

    def add(self, operation: Operation | str, code: int | None = None, **kwargs: Any) -> Fault:
        if kwargs.get("for_seconds") is not None and "times" not in kwargs:
            kwargs["times"] = None
        return self.append(Fault(Operation(operation), code=code, **kwargs))

    def take(self, device: str, operation: Operation, transport: str, *,
             properties: Mapping[str, str] | None = None, body: bytes | None = None) -> Fault | None:
        """The fault to apply now (using up one of its times), or None to answer normally.

        ``properties`` / ``body``: the message's, when the operation carries one (telemetry), so a
        poison-message fault can pick it out.
        """
        now = self.clock()
        with self._lock:
            for fault in list(self._faults):
                if fault.for_seconds is not None and fault.started is not None \
                        and now - fault.started >= fault.for_seconds:
                    self._faults.remove(fault)
                    continue
                if fault.matches(device, operation, transport, properties, body):
                    if fault.started is None:
                        fault.started = now
                    fault.hits += 1
                    if fault.times is not None and fault.hits >= fault.times:
                        self._faults.remove(fault)
                    return fault
        return None

    def remove(self, fault_id: int) -> bool:
        """Remove one entry by its id; False when there is none (used up, or never was)."""
        with self._lock:
            for fault in self._faults:
                if fault.fault_id == fault_id:
                    self._faults.remove(fault)
                    return True
        return False

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending(self) -> list[Fault]:
        now = self.clock()
        with self._lock:
            self._faults = [f for f in self._faults if f.for_seconds is None or f.started is None
                            or now - f.started < f.for_seconds]
            return list(self._faults)
