"""The supervisor: one upstream connection kept up by the policy, with deadlines on every operation.

Small parts, each testable alone: :mod:`.machine` (the connection's states and the legal moves between
them), :mod:`.gate` (throttle and quota park, one probe per attempt), :mod:`.holds` (work held for offline
devices), :mod:`.retry` (what a failed attempt leads to), :mod:`.report` (state changes, metrics and
the undelivered records), and :mod:`.core`, the thin async driver: the only code that waits.
"""

from gateway.handler.core import Handler, RefreshHook
from gateway.handler.holds import DeviceHolds, _Held
from gateway.handler.machine import ConnectionMachine, Event, IllegalTransition, State
from gateway.handler.report import Receipt, StateChange, Undelivered

__all__ = [
    "ConnectionMachine",
    "DeviceHolds",
    "Event",
    "Handler",
    "IllegalTransition",
    "Receipt",
    "RefreshHook",
    "State",
    "StateChange",
    "Undelivered",
    "_Held",
]
