"""The connection's state machine: states, events and the transitions table (h11 style).

Pure: no I/O, no clock of its own. The driver fires an event; the table says the next state, and a move
the table does not list raises :class:`IllegalTransition` (a bug in the driver, never a hub condition).
"""

from __future__ import annotations

import enum
from types import MappingProxyType

__all__ = ["TRANSITIONS", "ConnectionMachine", "Event", "IllegalTransition", "State"]


class State(enum.StrEnum):
    """The connection as the application sees it."""

    IDLE = "idle"  #: not started
    CONNECTING = "connecting"  #: the first connect is under way
    CONNECTED = "connected"
    RETRYING = "disconnected-retrying"  #: down; ``until`` is the next attempt
    THROTTLED = "throttled"  #: up or down, waiting out a throttle until ``until``
    PARKED = "parked"  #: nothing is sent until ``until``: daily quota used up, or repeated inferred takeovers
    STOPPED = "stopped"  #: given up; ``code`` and ``reason`` say why. Operations fail at once.
    CLOSED = "closed"  #: closed by the application


class Event(enum.StrEnum):
    """What happened to the connection."""

    START = "start"  #: the application started the handler
    CONNECTED = "connected"  #: a connect succeeded, or the throttle / park is over while connected
    LOST = "lost"  #: the connection is down (a drop, a refused connect, a renewal): retrying
    THROTTLED = "throttled"  #: the hub throttles: wait until the gate opens
    PARKED = "parked"  #: quota used up or inferred takeovers: wait long
    STOPPED = "stopped"  #: the policy gave up
    CLOSED = "closed"  #: the application closed the handler


_ACTIVE = (State.CONNECTING, State.CONNECTED, State.RETRYING, State.THROTTLED, State.PARKED)
_FROM_ACTIVE = {
    Event.CONNECTED: State.CONNECTED,
    Event.LOST: State.RETRYING,
    Event.THROTTLED: State.THROTTLED,
    Event.PARKED: State.PARKED,
    Event.STOPPED: State.STOPPED,
    Event.CLOSED: State.CLOSED,
}

#: (state, event) -> next state. Anything absent is illegal.
TRANSITIONS: MappingProxyType[tuple[State, Event], State] = MappingProxyType({
    (State.IDLE, Event.START): State.CONNECTING,
    (State.IDLE, Event.CLOSED): State.CLOSED,
    **{(state, event): nxt for state in _ACTIVE for event, nxt in _FROM_ACTIVE.items()},
    (State.STOPPED, Event.CLOSED): State.CLOSED,
})


class IllegalTransition(RuntimeError):
    """The driver tried a move the table does not allow (e.g. anything after CLOSED)."""


class ConnectionMachine:
    """The current state, moved only through :data:`TRANSITIONS`."""

    def __init__(self) -> None:
        self.state = State.IDLE

    def can(self, event: Event) -> bool:
        return (self.state, event) in TRANSITIONS

    def fire(self, event: Event) -> State:
        """Move on ``event`` and return the new state; raise :class:`IllegalTransition` if not allowed."""
        nxt = TRANSITIONS.get((self.state, event))
        if nxt is None:
            raise IllegalTransition(f"no transition from {self.state.value!r} on {event.value!r}")
        self.state = nxt
        return nxt

    @property
    def active(self) -> bool:
        """Started and neither stopped nor closed: operations may still succeed."""
        return self.state in _ACTIVE
