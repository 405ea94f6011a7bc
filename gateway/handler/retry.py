"""The operation retry loop's one decision, pure: what a failed attempt leads to.

The policy says what the error means (:data:`~gateway.policy.Decision`); :func:`after_failure` says what
the operation does next, given its deadline and whether an earlier attempt may have been delivered. The
driver (:mod:`.core`) only carries it out, so every branch is a table test away.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.policy import (
    Decision,
    HoldForDevice,
    ParkUntil,
    ReconnectAfter,
    RefreshCredentials,
    RetryAfter,
    Stop,
)

__all__ = ["Next", "Step", "after_failure"]


class Step(enum.StrEnum):
    """What the operation does after a failed attempt."""

    AWAIT_CONNECTION = "await_connection"  #: the connection is at stake: the supervisor decides; wait for it
    THROTTLE = "throttle"  #: close the gate until ``until``, then go round (one probe first)
    RETRY = "retry"  #: sleep ``delay`` on the same connection, then go round
    PARK = "park"  #: close the gate until ``until`` (quota), then go round
    HOLD = "hold"  #: wait in ``device``'s queue until it is online or ``until``
    EXPIRE = "expire"  #: the next attempt would come after the deadline: end now, with the last code
    FAIL = "fail"  #: dead-letter: the hub refused it for good
    UNKNOWN = "unknown"  #: dead-letter, but an earlier attempt may have been delivered: outcome unknown


@dataclass(frozen=True, slots=True)
class Next:
    step: Step
    delay: float = 0.0
    until: float = 0.0
    device: str | None = None
    duplicate: bool = False  #: this attempt may have been delivered: resends are possible duplicates
    adopt_history: bool = True  #: take the policy's new history (not when the supervisor will decide)
    detail: str = ""


def after_failure(decision: Decision, *, now: float, deadline: float, duplicate: bool) -> Next:
    """The next step of an operation whose attempt failed with ``decision`` (``duplicate``: so far)."""
    if isinstance(decision, (ReconnectAfter, RefreshCredentials, Stop)):
        dup = duplicate or (isinstance(decision, ReconnectAfter) and decision.possible_duplicate)
        return Next(Step.AWAIT_CONNECTION, duplicate=dup, adopt_history=False)
    if isinstance(decision, RetryAfter):
        dup = duplicate or decision.possible_duplicate
        if decision.throttled:
            return Next(Step.THROTTLE, until=now + decision.delay, duplicate=dup)
        if now + decision.delay >= deadline:
            return Next(Step.EXPIRE, duplicate=dup)
        return Next(Step.RETRY, delay=decision.delay, duplicate=dup)
    if isinstance(decision, ParkUntil):
        return Next(Step.PARK, until=decision.until, duplicate=duplicate)
    if isinstance(decision, HoldForDevice):
        return Next(Step.HOLD, until=min(deadline, decision.deadline), device=decision.device_id,
                    duplicate=duplicate)
    return Next(Step.UNKNOWN if duplicate else Step.FAIL, duplicate=duplicate, detail=decision.detail)
