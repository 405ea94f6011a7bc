"""The policy as tables: every catalog code, the backoff maths, and the config loader."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.codes import Action, CodeInfo, all_codes, code_of
from gateway.errors import IoTHubError, make_error
from gateway.policy import (
    Backoff,
    DeadLetter,
    History,
    HoldForDevice,
    Operation,
    ParkUntil,
    Policy,
    PolicyConfig,
    PolicyConfigError,
    ReconnectAfter,
    RefreshCredentials,
    RetryAfter,
    Stop,
    StopReason,
    load_policy,
    next_utc_midnight,
)

ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2024, 3, 1, 20, 0, tzinfo=UTC).timestamp()
ME = "me"
OTHER = "other-device"
POLICY = Policy()
HIST = History(identity=ME, can_refresh=True)


def err_for(info: CodeInfo, **kwargs: object) -> IoTHubError:
    transport = "mqtt" if "mqtt" in info.transports else sorted(info.transports)[0]
    return make_error(info.code, transport=transport, **kwargs)  # type: ignore[arg-type]


def op(attempt: int = 1, device: str | None = OTHER, started: float = NOW) -> Operation:
    return Operation(attempt=attempt, started=started, device_id=device)


CODES = list(all_codes())


def test_catalog_is_not_empty() -> None:
    assert len(CODES) > 150
    assert {c.action for c in CODES} == set(Action)


# -- decision tables over the whole catalog -------------------------------------------------------


@pytest.mark.parametrize("info", CODES, ids=lambda c: f"{c.code}-{c.name}")
def test_operation_decision_for_every_code(info: CodeInfo) -> None:
    err = err_for(info)
    d = POLICY.decide(err, HIST, now=NOW, rand=0.5, op=op())
    assert d.code == info.code
    a = info.action
    if a is Action.RETRY:
        assert isinstance(d, RetryAfter) and not d.throttled
        assert d.possible_duplicate == (info.name == "OperationTimedOut")
        assert 0 <= d.delay <= POLICY.config.retry.cap
    elif a is Action.THROTTLE:
        assert isinstance(d, RetryAfter) and d.throttled and not d.possible_duplicate
        assert POLICY.config.throttle.initial / 2 <= d.delay <= POLICY.config.throttle.initial
    elif a is Action.RECONNECT:
        assert isinstance(d, ReconnectAfter) and not d.identity_conflict
        assert d.possible_duplicate == (info.name != "NotConnected")
    elif a is Action.REFRESH_CREDENTIALS:
        assert d == RefreshCredentials(info.code)
    elif a is Action.WAIT_FOR_DEVICE:
        assert d == HoldForDevice(OTHER, NOW + POLICY.config.device.hold_timeout, info.code)
    elif a is Action.WAIT_FOR_QUOTA_RESET:
        assert isinstance(d, ParkUntil) and NOW < d.until <= NOW + POLICY.config.quota.probe_interval
    elif a is Action.STOP_IDENTITY_CONFLICT:
        assert isinstance(d, ReconnectAfter) and d.identity_conflict
    elif a is Action.STOP:  # aimed at another device: only that operation fails
        assert isinstance(d, DeadLetter)
    else:
        assert a is Action.FAIL
        assert isinstance(d, DeadLetter)


@pytest.mark.parametrize("info", CODES, ids=lambda c: f"{c.code}-{c.name}")
def test_connection_decision_for_every_code(info: CodeInfo) -> None:
    err = err_for(info)
    d, hist = POLICY.step(err, HIST, now=NOW, rand=0.5)
    assert d.code == info.code
    assert hist.connected_at is None
    a = info.action
    if a in (Action.RETRY, Action.RECONNECT, Action.WAIT_FOR_DEVICE):
        assert isinstance(d, ReconnectAfter) and not d.throttled and not d.identity_conflict
        assert d.delay == POLICY.config.reconnect.initial * 0.5
        assert hist.attempt == 1
    elif a is Action.THROTTLE:
        assert isinstance(d, ReconnectAfter) and d.throttled
        assert hist.throttle_attempt == 1
    elif a is Action.REFRESH_CREDENTIALS:
        assert d == RefreshCredentials(info.code) and hist.refreshed
    elif a is Action.WAIT_FOR_QUOTA_RESET:
        assert isinstance(d, ParkUntil)
    elif a is Action.STOP_IDENTITY_CONFLICT:
        assert isinstance(d, ReconnectAfter) and d.identity_conflict and hist.takeovers == (NOW,)
    else:
        assert a in (Action.STOP, Action.FAIL)
        assert isinstance(d, Stop) and d.reason is StopReason.REFUSED


@pytest.mark.parametrize("info", [c for c in CODES if c.action is Action.STOP], ids=lambda c: str(c.code))
def test_stop_codes_stop_the_connection_when_aimed_at_ourselves(info: CodeInfo) -> None:
    d = POLICY.decide(err_for(info), HIST, now=NOW, rand=0.5, op=op(device=ME))
    assert isinstance(d, Stop) and d.reason is StopReason.REFUSED


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (400027, ReconnectAfter), (409002, ReconnectAfter), (401003, RefreshCredentials), (401002, Stop),
        (404001, Stop), (403010, Stop), (403012, Stop), (403002, ParkUntil), (404103, ReconnectAfter),
        (404104, ReconnectAfter), (429001, ReconnectAfter), (500001, ReconnectAfter),
        (400004, Stop), (413001, Stop), (401901, Stop),
    ],
)
def test_named_connection_decisions(code: int, expected: type) -> None:
    d = POLICY.decide(make_error(code, transport="mqtt"), HIST, now=NOW, rand=0.3)
    assert type(d) is expected


@pytest.mark.parametrize("code", [400004, 400103, 413001, 412001])
def test_permanent_request_errors_dead_letter_without_retry(code: int) -> None:
    d = POLICY.decide(make_error(code, transport="http"), HIST, now=NOW, rand=0.3, op=op(device=ME))
    assert isinstance(d, DeadLetter) and d.code == code


@pytest.mark.parametrize("code", [429001, 429002, 429003, 503008])
def test_throttle_codes_use_the_throttle_curve(code: int) -> None:
    d = POLICY.decide(make_error(code, transport="amqp"), HIST, now=NOW, rand=0.0, op=op())
    assert isinstance(d, RetryAfter) and d.throttled
    assert d.delay == POLICY.config.throttle.initial / 2  # equal jitter floor


def test_unlisted_code_follows_its_family() -> None:
    err = make_error(429999, transport="http")
    assert err.code == code_of("GenericTooManyRequests")  # an unlisted code is carried as its family's
    d = POLICY.decide(err, HIST, now=NOW, rand=0.5, op=op())
    assert isinstance(d, RetryAfter) and d.throttled and d.code == err.code


# -- backoff -----------------------------------------------------------------------------------------


def test_full_jitter_spans_zero_to_the_step() -> None:
    b = Backoff(initial=1.0, multiplier=2.0, cap=60.0, jitter=1.0)
    assert b.delay(1, 0.0) == 0.0
    assert b.delay(3, 0.999999) == pytest.approx(4.0, rel=1e-5)
    assert b.delay(4, 0.5) == 4.0
    assert b.step_for(100) == 60.0
    assert b.step_for(10**6) == 60.0  # no OverflowError
    assert b.delay(10**6, 0.999) <= 60.0


def test_op_retry_delays_grow_and_stop_at_the_limits() -> None:
    p = Policy(PolicyConfig(retry=Backoff(initial=1.0, multiplier=2.0, cap=8.0, jitter=1.0, max_attempts=5,
                                          max_elapsed=100.0)))
    e = make_error(code_of("ServerBusy"), transport="http")
    steps = []
    for n in range(1, 5):
        d = p.decide(e, HIST, now=NOW, rand=0.999999, op=op(n))
        assert isinstance(d, RetryAfter) and d.attempt == n
        steps.append(round(d.delay))
    assert steps == [1, 2, 4, 8]
    assert isinstance(p.decide(e, HIST, now=NOW, rand=0.5, op=op(5)), DeadLetter)
    assert isinstance(p.decide(e, HIST, now=NOW + 100, rand=0.5, op=op(2)), DeadLetter)


def test_reconnect_limits_stop_with_retry_expired() -> None:
    p = Policy(PolicyConfig(reconnect=Backoff(initial=1, cap=10, max_attempts=3, max_elapsed=0)))
    e = make_error(code_of("ConnectionRefused"), transport="mqtt")
    h = HIST
    kinds = []
    for i in range(3):
        d, h = p.step(e, h, now=NOW + i, rand=0.5)
        kinds.append(type(d).__name__)
    assert kinds == ["ReconnectAfter", "ReconnectAfter", "Stop"]
    assert isinstance(d, Stop) and d.reason is StopReason.RETRY_EXPIRED
    assert "3 attempts" in d.detail


@pytest.mark.parametrize("info", [c for c in CODES if c.action is Action.FAIL], ids=lambda c: str(c.code))
def test_a_live_connection_closed_over_a_bad_request_reconnects(info: CodeInfo) -> None:
    """E.g. MQTT 5 DISCONNECT 0x95 (413001) after an oversized publish: the message fails, not the link."""
    live = HIST.on_connected(NOW - 60)
    d, hist = POLICY.step(err_for(info), live, now=NOW, rand=0.5)
    assert isinstance(d, ReconnectAfter) and not d.identity_conflict and d.code == info.code
    assert hist.attempt == 1 and hist.connected_at is None
    refused, _ = POLICY.step(err_for(info), HIST, now=NOW, rand=0.5)  # the same code refusing a connect
    assert isinstance(refused, Stop) and refused.reason is StopReason.REFUSED


def test_connected_resets_the_outage() -> None:
    e = make_error(code_of("ConnectionRefused"), transport="mqtt")
    _, h = POLICY.step(e, HIST, now=NOW, rand=0.5)
    _, h = POLICY.step(e, h, now=NOW + 1, rand=0.5)
    assert h.attempt == 2 and h.retry_since == NOW
    h = h.on_connected(NOW + 2)
    assert h.attempt == 0 and h.retry_since is None and h.connected_at == NOW + 2


# -- throttling --------------------------------------------------------------------------------------


def test_retry_after_is_honoured_and_capped() -> None:
    e = make_error(429001, transport="http", retry_after=7.0)
    d = POLICY.decide(e, HIST, now=NOW, rand=0.0, op=op())
    assert isinstance(d, RetryAfter) and d.delay == 7.0
    d = POLICY.decide(e, HIST, now=NOW, rand=0.99, op=op())
    assert isinstance(d, RetryAfter) and 7.0 < d.delay < 7.7
    big = make_error(429001, transport="http", retry_after=86_400.0)
    d = POLICY.decide(big, HIST, now=NOW, rand=0.5, op=op())
    assert isinstance(d, RetryAfter) and d.delay == POLICY.config.throttle.max_retry_after
    at = make_error(429001, transport="http", retry_at=NOW + 20)
    d = POLICY.decide(at, HIST, now=NOW, rand=0.0, op=op())
    assert isinstance(d, RetryAfter) and d.delay == 20.0


def test_throttle_curve_climbs_then_resets_after_success() -> None:
    e = make_error(429001, transport="mqtt")
    h = HIST
    delays = []
    for _ in range(5):
        d, h = POLICY.step(e, h, now=NOW, rand=0.999999, op=op())
        assert isinstance(d, RetryAfter)
        delays.append(round(d.delay))
    assert delays == [10, 20, 40, 80, 120]
    assert h.throttle_attempt == 5
    h = h.on_success()
    assert h.throttle_attempt == 0
    d = POLICY.decide(e, h, now=NOW, rand=0.999999, op=op())
    assert isinstance(d, RetryAfter) and round(d.delay) == 10


def test_throttle_is_slower_than_ordinary_retry() -> None:
    t = POLICY.decide(make_error(429001, transport="http"), HIST, now=NOW, rand=0.0, op=op())
    r = POLICY.decide(make_error(500001, transport="http"), HIST, now=NOW, rand=0.999, op=op())
    assert isinstance(t, RetryAfter) and isinstance(r, RetryAfter)
    assert t.delay > r.delay


# -- quota -------------------------------------------------------------------------------------------


def test_next_utc_midnight() -> None:
    assert next_utc_midnight(NOW) == datetime(2024, 3, 2, tzinfo=UTC).timestamp()
    midnight = datetime(2024, 3, 2, tzinfo=UTC).timestamp()
    assert next_utc_midnight(midnight) == midnight + 86_400


def test_quota_parks_until_probe_or_midnight_whichever_first() -> None:
    e = make_error(403002, transport="amqp")
    d = POLICY.decide(e, HIST, now=NOW, rand=0.5, op=op())  # 20:00 UTC: the probe (1 h) comes first
    assert d == ParkUntil(NOW + 3600, 403002)
    late = datetime(2024, 3, 1, 23, 50, tzinfo=UTC).timestamp()
    d = POLICY.decide(e, HIST, now=late, rand=0.5, op=op())
    assert d == ParkUntil(datetime(2024, 3, 2, tzinfo=UTC).timestamp() + 150, 403002)
    no_probe = Policy(PolicyConfig(quota=dataclasses.replace(PolicyConfig().quota, probe_interval=86_400 * 2)))
    d = no_probe.decide(e, HIST, now=NOW, rand=0.0, op=op())
    assert d == ParkUntil(datetime(2024, 3, 2, tzinfo=UTC).timestamp(), 403002)


# -- credentials -------------------------------------------------------------------------------------


def test_refresh_then_stop_when_refused_again() -> None:
    e = make_error(401003, transport="mqtt")
    d, h = POLICY.step(e, HIST.on_connected(NOW - 3000), now=NOW, rand=0.5)
    assert isinstance(d, RefreshCredentials) and h.refreshed
    d, h = POLICY.step(e, h, now=NOW + 1, rand=0.5)  # the reconnect with the new token is refused
    assert isinstance(d, Stop) and d.reason is StopReason.UNAUTHORIZED and "refreshed" in d.detail


def test_refreshed_token_that_worked_for_a_while_is_refreshed_again() -> None:
    e = make_error(401003, transport="mqtt")
    _, h = POLICY.step(e, HIST, now=NOW, rand=0.5)
    h = h.on_connected(NOW + 1)  # connected with the new token, then it expired an hour later
    d, _ = POLICY.step(e, h, now=NOW + 3600, rand=0.5)
    assert isinstance(d, RefreshCredentials)


def test_no_refresh_hook_means_unauthorized_stop() -> None:
    d = POLICY.decide(make_error(401003, transport="http"), History(identity=ME), now=NOW, rand=0.5)
    assert isinstance(d, Stop) and d.reason is StopReason.UNAUTHORIZED


@pytest.mark.parametrize("code", [401002, 404001, 403010, 403012])
def test_permanent_refusals_stop(code: int) -> None:
    d = POLICY.decide(make_error(code, transport="mqtt"), HIST, now=NOW, rand=0.5)
    assert isinstance(d, Stop) and d.reason is StopReason.REFUSED


# -- identity conflicts ------------------------------------------------------------------------------


def test_identity_conflict_backs_off_long_then_stops_naming_the_device() -> None:
    e = make_error(400027, transport="amqp")
    h = HIST
    t = NOW
    delays = []
    for _ in range(2):
        d, h = POLICY.step(e, h, now=t, rand=0.0)
        assert isinstance(d, ReconnectAfter) and d.identity_conflict
        delays.append(d.delay)
        t += 60
    assert delays == [15.0, 30.0]  # equal jitter floor of 30 s, 60 s
    d, h = POLICY.step(e, h, now=t, rand=0.0)
    assert isinstance(d, Stop) and d.reason is StopReason.IDENTITY_CONFLICT
    assert repr(ME) in d.detail and "3 takeovers" in d.detail


def test_takeovers_outside_the_window_are_forgotten() -> None:
    e = make_error(409002, transport="amqp")
    h = HIST
    for i in range(20):
        d, h = POLICY.step(e, h, now=NOW + i * 1000.0, rand=0.5)  # window is 900 s
        assert isinstance(d, ReconnectAfter)
    assert len(h.takeovers) == 1


def test_quick_drops_are_no_longer_an_identity_conflict() -> None:
    """The quick-drop rule is gone (issue 10 #2): a drop soon after connecting is a plain reconnect."""
    drop = make_error(code_of("DeviceConnectionClosedRemotely"), transport="mqtt")
    h = HIST
    for i in range(6):
        h = h.on_connected(NOW + i * 3)
        d, h = POLICY.step(drop, h, now=NOW + i * 3 + 1, rand=0.5)
        assert isinstance(d, ReconnectAfter) and not d.identity_conflict and not d.inferred_takeover


# -- MQTT 3.1.1: ambiguous drops (tables) -----------------------------------------------------------------

AMBIG = History(identity=ME, can_refresh=True, ambiguous_drops=True)
BARE = make_error(code_of("DeviceConnectionClosedRemotely"), transport="mqtt", exact=False)


def drops(script: list[tuple[str, tuple[str, ...]]], policy: Policy = POLICY) -> list[tuple[object, History]]:
    """Run a script of ("drop", in_flight) and ("ok", message id) steps; return each drop's decision."""
    h = AMBIG.on_connected(NOW)
    t = NOW
    out: list[tuple[object, History]] = []
    for what, arg in script:
        t += 1
        if what == "ok":
            h = h.on_delivered(arg[0])
        else:
            d, h = policy.step(BARE, h, now=t, rand=0.5, in_flight=arg)
            out.append((d, h))
            h = h.on_connected(t + 1)
    return out


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        # a drop with a publish in flight is put down to it, never to a takeover, and starts suspect mode
        ([("drop", ("a", "b"))], [("reconnect", ())]),
        # every send drops, nothing flows: throttling, never poison however often
        ([("drop", ("a",))] * 8, [("reconnect", ())] + [("throttled", ())] * 7),
        # "p" alone in flight at 3 drops while others flow: poison; the first drop had two in flight
        ([("drop", ("p", "a")), ("ok", ("a",)), ("drop", ("p",)), ("ok", ("b",)), ("drop", ("p",)),
          ("ok", ("c",)), ("drop", ("p",))],
         [("reconnect", ()), ("reconnect", ()), ("reconnect", ()), ("reconnect", ("p",))]),
        # alone at 3 drops but nothing delivered between them: throttling, not poison
        ([("drop", ("p",)), ("drop", ("p",)), ("drop", ("p",))], [("reconnect", ()), ("throttled", ()),
                                                                   ("throttled", ())]),
    ],
)
def test_drops_with_sends_in_flight(script: list[tuple[str, tuple[str, ...]]],
                                    expected: list[tuple[str, tuple[str, ...]]]) -> None:
    got = []
    for d, h in drops(script):
        assert isinstance(d, ReconnectAfter) and d.attributed and not d.identity_conflict
        assert h.suspect == POLICY.config.drops.suspect_successes
        got.append(("throttled" if d.throttled else "reconnect", d.poison))
    assert got == expected


def test_throttle_like_drops_climb_the_throttle_curve_and_a_delivery_resets_it() -> None:
    outs = drops([("drop", ("a",))] * 4)
    delays = [d.delay for d, _ in outs if isinstance(d, ReconnectAfter) and d.throttled]
    assert delays == [7.5, 15.0, 30.0]  # equal jitter (u=0.5) of 10, 20, 40
    h = outs[-1][1].on_connected(NOW + 100).on_success().on_delivered("a")
    assert h.throttle_attempt == 0 and h.drop_records == {}


def test_suspect_mode_ends_after_enough_deliveries_and_orders_by_drops() -> None:
    (_, h), = drops([("drop", ("a", "b"))])
    assert h.drops_of("a") == 1 and h.drops_of("zzz") == 0
    for i in range(POLICY.config.drops.suspect_successes):
        assert h.suspect > 0
        h = h.on_delivered(f"x{i}")
    assert h.suspect == 0


def test_drop_records_are_bounded() -> None:
    small = Policy(PolicyConfig(drops=dataclasses.replace(PolicyConfig().drops, max_tracked=3)))
    outs = drops([("drop", tuple(f"m{i}" for i in range(10)))], policy=small)
    assert list(outs[-1][1].drop_records) == ["m7", "m8", "m9"]


def test_drops_with_nothing_in_flight_park_long_never_stop() -> None:
    kinds = []
    h = AMBIG
    t = NOW
    for _ in range(9):
        h = h.on_connected(t)
        d, h = POLICY.step(BARE, h, now=t + 1, rand=0.5, in_flight=())
        kinds.append("park" if isinstance(d, ParkUntil) else "reconnect")
        assert not isinstance(d, Stop)
        if isinstance(d, ParkUntil):
            assert d.takeover and d.until == t + 1 + POLICY.config.drops.takeover_park
            t = d.until
        else:
            assert isinstance(d, ReconnectAfter) and d.inferred_takeover and not d.identity_conflict
            t += 5
    assert kinds == ["reconnect", "reconnect", "park"] * 3


@pytest.mark.parametrize("code", [400027, 409002])
def test_exact_takeover_codes_still_stop_but_inferred_ones_park(code: int) -> None:
    for exact, expected in ((True, Stop), (False, ParkUntil)):
        e = make_error(code, transport="mqtt", exact=exact)
        h = AMBIG
        for i in range(3):
            d, h = POLICY.step(e, h.on_connected(NOW + i * 60), now=NOW + i * 60 + 1, rand=0.5)
        assert type(d) is expected, exact


def test_ambiguous_rules_only_on_ambiguous_transports_and_inexact_drops() -> None:
    plain = HIST.on_connected(NOW)
    d, _ = POLICY.step(BARE, plain, now=NOW + 1, rand=0.5, in_flight=("a",))
    assert isinstance(d, ReconnectAfter) and not d.attributed
    exact = make_error(code_of("DeviceConnectionClosedRemotely"), transport="mqtt")
    d, h = POLICY.step(exact, AMBIG.on_connected(NOW), now=NOW + 1, rand=0.5, in_flight=("a",))
    assert isinstance(d, ReconnectAfter) and not d.attributed and h.drop_records == {}


def test_poison_code_is_a_fail_code_chosen_by_size() -> None:
    from gateway.codes import lookup
    from gateway.policy import MAX_D2C_MESSAGE, poison_code

    assert poison_code() == poison_code(100) == code_of("ArgumentInvalid")
    assert poison_code(MAX_D2C_MESSAGE) == code_of("ArgumentInvalid")
    assert poison_code(MAX_D2C_MESSAGE + 1) == code_of("MessageTooLarge")
    assert {lookup(poison_code(n)).action for n in (0, MAX_D2C_MESSAGE + 1)} == {Action.FAIL}


# -- wall clock vs monotonic ---------------------------------------------------------------------------


def test_quota_target_uses_the_wall_clock_once_and_lands_on_the_monotonic_clock() -> None:
    e = make_error(403002, transport="amqp")
    late = datetime(2024, 3, 1, 23, 50, tzinfo=UTC).timestamp()
    d = POLICY.decide(e, HIST, now=1000.0, wall=late, rand=0.0, op=op())
    assert d == ParkUntil(1000.0 + 600, 403002)  # ten minutes to 00:00 UTC, counted from monotonic 1000


def test_http_date_retry_after_is_measured_on_the_wall_clock() -> None:
    e = make_error(429001, transport="http", retry_at=NOW + 20)
    d = POLICY.decide(e, HIST, now=5.0, wall=NOW, rand=0.0, op=op())
    assert isinstance(d, RetryAfter) and d.delay == 20.0


# -- device offline ----------------------------------------------------------------------------------


def test_offline_hold_uses_the_error_device_first() -> None:
    e = make_error(404103, transport="http", device_id="d7")
    d = POLICY.decide(e, HIST, now=NOW, rand=0.5, op=op(device="d1"))
    assert isinstance(d, HoldForDevice) and d.device_id == "d7"


def test_offline_without_a_device_is_an_ordinary_retry() -> None:
    d = POLICY.decide(make_error(504101, transport="http"), HIST, now=NOW, rand=0.5, op=op(device=None))
    assert isinstance(d, RetryAfter) and not d.throttled


# -- purity ------------------------------------------------------------------------------------------


def test_same_inputs_same_decision_and_history_untouched() -> None:
    e = make_error(400027, transport="mqtt")
    h = HIST.on_connected(NOW - 100)
    first = POLICY.step(e, h, now=NOW, rand=random.Random(7))
    second = POLICY.step(e, h, now=NOW, rand=random.Random(7))
    assert first == second
    assert h == HIST.on_connected(NOW - 100)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan")])
def test_rand_must_be_in_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match="rand"):
        POLICY.decide(make_error(500001, transport="http"), HIST, now=NOW, rand=bad)


# -- configuration -----------------------------------------------------------------------------------


def test_shipped_policy_file_is_the_defaults() -> None:
    assert load_policy(ROOT / "configs" / "policy.toml").config == PolicyConfig()


def test_override_by_name_and_by_number() -> None:
    cfg = PolicyConfig.from_mapping({
        "codes": {"ServerBusy": {"action": "throttle"}, "503003": {"cap": 10.0, "initial": 2}},
    })
    p = Policy(cfg)
    d = p.decide(make_error(503005, transport="http"), HIST, now=NOW, rand=0.0, op=op())
    assert isinstance(d, RetryAfter) and d.throttled
    assert p.curve(Action.RETRY, 503003).cap == 10.0
    d = p.decide(make_error(503003, transport="http"), HIST, now=NOW, rand=0.999999, op=op(5))
    assert isinstance(d, RetryAfter) and d.delay == pytest.approx(10.0, rel=1e-5)


def test_alias_code_override_lands_on_the_canonical_code() -> None:
    cfg = PolicyConfig.from_mapping({"codes": {"404102": {"action": "fail"}}})
    assert 404103 in cfg.codes


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"retyr": {}}, r"unknown section \[retyr\]"),
        ({"retry": {"intial": 1.0}}, r"\[retry\]: unknown key 'intial'"),
        ({"retry": {"initial": -1}}, r"retry\] initial: expected a finite number >= 0"),
        ({"retry": {"initial": "1"}}, "expected a number"),
        ({"retry": {"initial": True}}, "expected a number"),
        ({"retry": {"max_attempts": 2.5}}, "expected a whole number"),
        ({"retry": {"jitter": 1.5}}, r"within \[0, 1\]"),
        ({"retry": {"multiplier": 0.5}}, "must be >= 1"),
        ({"retry": {"initial": 100.0}}, r"cap \(30.0\) must be >= initial"),
        ({"drops": {"poison_after": 0}}, "must be >= 1"),
        ({"identity": {"quick_drop": 5.0}}, r"'quick_drop' was removed: .*\[drops\]"),
        ({"drops": {"takeover_repeat": 1.5}}, "expected a whole number"),
        ({"retry": 3}, "expected a table"),
        ({"codes": {"999999": {"action": "retry"}}}, "not a six-digit IoT Hub error code"),
        ({"codes": {"429999": {"action": "retry"}}}, "unknown code 429999"),
        ({"codes": {"NoSuchCode": {"action": "retry"}}}, "unknown code name 'NoSuchCode'"),
        ({"codes": {"500001": {"action": "explode"}}}, "unknown action 'explode'"),
        ({"codes": {"500001": {"delay": 3}}}, "unknown key 'delay'"),
        ({"codes": {"500001": {"cap": 0.1}}}, r"\[codes.500001\] cap \(0.1\) must be >= initial"),
        ({"codes": {"500001": {}, "ServerError": {}}}, "configured twice"),
        ({"codes": {"500001": 1}}, "expected a table"),
    ],
)
def test_config_errors_are_clear(data: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyConfigError, match=message):
        PolicyConfig.from_mapping(data)


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text("[retry\ninitial = 1\n")
    with pytest.raises(PolicyConfigError, match=r"policy\.toml: not valid TOML"):
        load_policy(bad)
    bad.write_text("[retry]\ninitial = -2\n")
    with pytest.raises(PolicyConfigError, match=r"policy.toml: \[retry\] initial"):
        load_policy(bad)


# -- refusals with an inferred permanent code ----------------------------------------------------------


@pytest.mark.parametrize("code", [code_of("ArgumentInvalid"), code_of("GenericNotFound"), code_of("InvalidOperation")])
def test_an_inexact_refusal_is_tried_again_before_the_device_stops(code: int) -> None:
    """amqp:invalid-field on a shared connection, a proxy's bare 404: not the hub's word, so not at once."""
    err = make_error(code, transport="amqp", exact=False)
    limit = POLICY.config.reconnect.inexact_refusals
    hist = HIST
    for n in range(1, limit):
        d, hist = POLICY.step(err, hist, now=NOW + n, rand=0.5)
        assert isinstance(d, ReconnectAfter) and d.code == code and hist.refusals == n
    d, hist = POLICY.step(err, hist, now=NOW + limit, rand=0.5)
    assert isinstance(d, Stop) and d.reason is StopReason.REFUSED and d.code == code


def test_a_connect_between_inexact_refusals_starts_the_count_again() -> None:
    err = make_error(code_of("ArgumentInvalid"), transport="amqp", exact=False)
    hist = HIST
    for n in range(5):
        d, hist = POLICY.step(err, hist, now=NOW + n, rand=0.5)
        assert isinstance(d, ReconnectAfter)
        if n % 2:
            hist = hist.on_connected(NOW + n)
    assert hist.refusals == 0


def test_the_inexact_refusal_limit_is_configurable_and_one_means_at_once(tmp_path: Path) -> None:
    f = tmp_path / "policy.toml"
    f.write_text("[reconnect]\ninexact_refusals = 1\n")
    strict = load_policy(f)
    err = make_error(code_of("ArgumentInvalid"), transport="amqp", exact=False)
    assert isinstance(strict.decide(err, HIST, now=NOW, rand=0.5), Stop)
    f.write_text("[reconnect]\ninexact_refusals = 0\n")
    with pytest.raises(PolicyConfigError, match="inexact_refusals"):
        load_policy(f)
    old = Policy(PolicyConfig(reconnect=Backoff(initial=1, cap=10)))  # a plain curve keeps the default limit
    assert isinstance(old.decide(err, HIST, now=NOW, rand=0.5), ReconnectAfter)
