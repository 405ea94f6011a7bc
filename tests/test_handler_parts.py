"""The handler's small parts alone: the state machine's table, the gate's one-probe-per-attempt rule and
the retry loop's decision."""

from __future__ import annotations

import pytest

from gateway.codes import code_of
from gateway.errors import make_error
from gateway.handler import ConnectionMachine, Event, IllegalTransition, State
from gateway.handler.gate import Gate
from gateway.handler.machine import TRANSITIONS
from gateway.handler.retry import Step, after_failure
from gateway.policy import (
    DeadLetter,
    HoldForDevice,
    ParkUntil,
    ReconnectAfter,
    RefreshCredentials,
    RetryAfter,
    Stop,
    StopReason,
)

ACTIVE = [State.CONNECTING, State.CONNECTED, State.RETRYING, State.THROTTLED, State.PARKED]


def machine_in(state: State) -> ConnectionMachine:
    m = ConnectionMachine()
    m.state = state
    return m


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [
        (State.IDLE, Event.START, State.CONNECTING),
        (State.IDLE, Event.CLOSED, State.CLOSED),
        (State.CONNECTING, Event.CONNECTED, State.CONNECTED),
        (State.CONNECTING, Event.LOST, State.RETRYING),
        (State.CONNECTED, Event.THROTTLED, State.THROTTLED),
        (State.THROTTLED, Event.CONNECTED, State.CONNECTED),
        (State.RETRYING, Event.PARKED, State.PARKED),
        (State.PARKED, Event.LOST, State.RETRYING),
        (State.RETRYING, Event.STOPPED, State.STOPPED),
        (State.STOPPED, Event.CLOSED, State.CLOSED),
    ],
)
def test_legal_moves(state: State, event: Event, expected: State) -> None:
    m = machine_in(state)
    assert m.can(event) and m.fire(event) is expected and m.state is expected


@pytest.mark.parametrize(
    ("state", "event"),
    [
        (State.IDLE, Event.CONNECTED),  # nothing happens before start
        (State.CONNECTED, Event.START),  # started once
        (State.STOPPED, Event.CONNECTED),  # a stop is final until the app closes
        (State.STOPPED, Event.THROTTLED),
        *[(State.CLOSED, e) for e in Event],  # nothing after close
    ],
)
def test_illegal_moves_raise(state: State, event: Event) -> None:
    m = machine_in(state)
    assert not m.can(event)
    with pytest.raises(IllegalTransition):
        m.fire(event)
    assert m.state is state


def test_every_active_state_can_reach_every_other_and_stop_and_close() -> None:
    for state in ACTIVE:
        reached = {TRANSITIONS[(state, e)] for e in Event if (state, e) in TRANSITIONS}
        assert reached == {State.CONNECTED, State.RETRYING, State.THROTTLED, State.PARKED, State.STOPPED, State.CLOSED}
    assert {s for (s, _) in TRANSITIONS} == set(State) - {State.CLOSED}


def test_gate_lets_one_probe_per_attempt() -> None:
    gate = Gate()
    a, b = object(), object()
    assert not gate.closed_to(a, 0.0)
    gate.throttle(make_error(code_of("ThrottlingException"), transport="mqtt"), 10.0)
    assert gate.closed_to(a, 5.0) and gate.closed_to(b, 5.0)
    assert not gate.closed_to(a, 10.0)
    gate.enter(a)  # a's attempt probes
    assert gate.closed_to(b, 10.0)
    assert gate.release(a)  # a's attempt ended (held for an offline device, say): b may probe now
    assert not gate.closed_to(b, 10.0)
    gate.enter(b)
    assert not gate.release(a)  # a no longer owns the slot
    assert gate.open() and not gate.active and not gate.closed_to(a, 10.0)
    assert not gate.open()  # already open


def test_gate_keeps_the_later_end() -> None:
    gate = Gate()
    err = make_error(code_of("IotHubQuotaExceeded"), transport="amqp")
    gate.park(err, 100.0)
    gate.throttle(make_error(code_of("ThrottlingException"), transport="amqp"), 50.0)
    assert gate.until == 100.0 and gate.cause is not None and gate.cause.code != err.code


# -- the retry loop's decision, as a table ---------------------------------------------------------------

NOW, DEADLINE = 100.0, 160.0


@pytest.mark.parametrize(
    ("decision", "duplicate", "step", "dup_after"),
    [
        (ReconnectAfter(1.0, 404104, 1, possible_duplicate=True), False, Step.AWAIT_CONNECTION, True),
        (ReconnectAfter(1.0, 503904, 1), False, Step.AWAIT_CONNECTION, False),
        (RefreshCredentials(401003), True, Step.AWAIT_CONNECTION, True),
        (Stop(StopReason.REFUSED, 403012, "x"), False, Step.AWAIT_CONNECTION, False),
        (RetryAfter(5.0, 429001, 1, throttled=True), False, Step.THROTTLE, False),
        (RetryAfter(5.0, 500001, 1), False, Step.RETRY, False),
        (RetryAfter(60.0, 500001, 1), False, Step.EXPIRE, False),  # 100 + 60 >= 160: no point waiting
        (RetryAfter(5.0, 504901, 1, possible_duplicate=True), False, Step.RETRY, True),
        (ParkUntil(3700.0, 403002), False, Step.PARK, False),
        (HoldForDevice("d9", 400.0, 404103), False, Step.HOLD, False),
        (DeadLetter(400004, "bad"), False, Step.FAIL, False),
        (DeadLetter(400004, "bad"), True, Step.UNKNOWN, True),  # an earlier attempt may have gone through
    ],
)
def test_after_failure(decision: object, duplicate: bool, step: Step, dup_after: bool) -> None:
    nxt = after_failure(decision, now=NOW, deadline=DEADLINE, duplicate=duplicate)  # type: ignore[arg-type]
    assert nxt.step is step and nxt.duplicate is dup_after
    assert nxt.adopt_history is (step is not Step.AWAIT_CONNECTION)
    if step is Step.THROTTLE:
        assert nxt.until == NOW + 5.0
    if step is Step.HOLD:
        assert nxt.device == "d9" and nxt.until == DEADLINE  # the earlier of its deadline and the hold's
    if step is Step.RETRY:
        assert nxt.delay == 5.0
