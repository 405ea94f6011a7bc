"""The gate: after a throttle or a quota park nothing is sent until ``until``, then one attempt probes.

Pure bookkeeping on monotonic instants; the driver does the waiting. The probe slot is held for one
attempt, not for a whole operation: whatever the attempt's outcome (success, throttled again, held for an
offline device, retried later), the slot is released at once, so an operation that goes on waiting for
another reason never keeps everyone else behind the gate.
"""

from __future__ import annotations

from gateway.errors import IoTHubError

__all__ = ["Gate"]


class Gate:
    """Throttle and park deadlines (monotonic), the error behind them and the current probe."""

    def __init__(self) -> None:
        self.cause: IoTHubError | None = None  #: the throttle or quota error gating sends
        self.throttled_until = 0.0
        self.parked_until = 0.0
        self.probe: object | None = None  #: the attempt (its operation) probing the gate now

    @property
    def until(self) -> float:
        return max(self.parked_until, self.throttled_until)

    def throttle(self, err: IoTHubError, until: float) -> float:
        """Close the gate until at least ``until``; returns the gate's end."""
        self.cause = err
        self.probe = None
        self.throttled_until = max(self.throttled_until, until)
        return self.throttled_until

    def park(self, err: IoTHubError, until: float) -> float:
        self.cause = err
        self.probe = None
        self.parked_until = max(self.parked_until, until)
        return self.parked_until

    def closed_to(self, op: object, now: float) -> bool:
        """True when ``op`` may not start an attempt now (before the end, or another attempt probes)."""
        return now < self.until or (self.cause is not None and self.probe not in (None, op))

    def enter(self, op: object) -> None:
        """``op`` starts an attempt through the open gate: after a throttle or park, it is the probe."""
        if self.cause is not None:
            self.probe = op

    def release(self, op: object) -> bool:
        """The attempt of ``op`` ended without proving the gate open: let another one probe."""
        if self.probe is op:
            self.probe = None
            return True
        return False

    def open(self) -> bool:
        """A success: the throttle or park is over for everyone. True if it was closed."""
        if self.cause is None and not self.throttled_until:
            return False
        self.cause = None
        self.probe = None
        self.throttled_until = 0.0
        return True

    @property
    def active(self) -> bool:
        return self.cause is not None or bool(self.throttled_until)
