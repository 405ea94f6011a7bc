"""SAS tokens (what all fronts and adapters agree on) and the shared fault plan."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.emulator import FaultKind, FaultPlan, Hub, Operation
from gateway.emulator.faults import Fault
from gateway.sas import ConnectionString, parse_sas_token, verify_sas_token

KEY = "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0xMjM0NTY3OA=="


def test_token_round_trip_expiry_and_mismatch() -> None:
    cs = ConnectionString.parse(f"HostName=h.azure-devices.net;DeviceId=d 1;SharedAccessKey={KEY}")
    token = cs.token(expiry=1000)
    assert parse_sas_token(token).resource_uri == "h.azure-devices.net/devices/d 1"
    assert verify_sas_token(token, cs.resource_uri, KEY, now=999) is None
    assert verify_sas_token(token, cs.resource_uri, KEY, now=1000) == "expired"
    assert verify_sas_token(token, "h.azure-devices.net/devices/other", KEY, now=0) == "mismatch"
    other_key = "b3RoZXIta2V5LW90aGVyLWtleS1vdGhlci1rZXktMTIzNA=="
    assert verify_sas_token(token, cs.resource_uri, other_key, now=0) == "mismatch"
    assert KEY not in repr(cs)


@pytest.mark.parametrize("bad", ["", "HostName=h", "DeviceId=d", "HostName=h;DeviceId=d;SharedAccessKey=!!!",
                                 "HostName;DeviceId=d"])
def test_bad_connection_strings_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        ConnectionString.parse(bad)


@given(st.text(max_size=300))
def test_verify_never_crashes_on_hostile_tokens(token: str) -> None:
    assert verify_sas_token(token, "h/devices/d", KEY, now=0) in {None, "malformed", "mismatch", "expired"}


def test_plan_answers_n_times_then_succeeds_and_filters() -> None:
    plan = FaultPlan()
    plan.add("telemetry", 429001, device="d", times=3, retry_after=2, transport="http")
    plan.add("connect", kind="drop", transport="mqtt", times=None)
    assert plan.take("d", Operation.TELEMETRY, "amqp") is None  # an HTTP fault
    got = [plan.take("d", Operation.TELEMETRY, "http") for _ in range(4)]
    assert [f.code if f else None for f in got] == [429001, 429001, 429001, None]
    assert plan.take("other", Operation.TELEMETRY, "http") is None
    assert plan.take("x", Operation.CONNECT, "amqp") is None
    for _ in range(5):
        fault = plan.take("x", Operation.CONNECT, "mqtt")
        assert fault is not None and fault.kind is FaultKind.DROP


def test_bad_faults_are_rejected() -> None:
    with pytest.raises(ValueError):
        Fault(Operation.TELEMETRY)  # an error with no code
    with pytest.raises(ValueError):
        Fault(Operation.TELEMETRY, code=12)
    with pytest.raises(ValueError):
        Fault.from_dict({"operation": "telemetry", "code": 429001, "bogus": 1})
    with pytest.raises(ValueError):
        Fault(Operation.TELEMETRY, code=429001, times=0)


def test_plan_is_thread_safe() -> None:
    plan = FaultPlan()
    plan.add("telemetry", 503003, times=1000)
    hits: list[int] = []

    def worker() -> None:
        for _ in range(300):
            if plan.take("d", Operation.TELEMETRY, "amqp"):
                hits.append(1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(hits) == 1000


def test_hub_takeover_and_online_state() -> None:
    hub = Hub()
    hub.add_device("d")
    first, second = object(), object()
    assert hub.attach("d", "mqtt", first) is None
    assert hub.attach("d", "amqp", second) == ("mqtt", first)
    hub.detach("d", first)  # the old session going away does not unplug the new one
    assert hub.is_online("d")
    hub.detach("d", second)
    assert not hub.is_online("d")
    assert hub.authenticate("nobody", None, 0) == "unknown"
    hub.device("d").enabled = False  # type: ignore[union-attr]
    assert hub.authenticate("d", hub.token("d", 10), 0) == "disabled"
