"""The service's desired-property update (``PATCH /twins/{id}``) and its push to connected devices.

The service patches through the HTTP front; the hub merges the patch into the twin and tells the
device where it listens: an MQTT device on ``$iothub/twin/PATCH/properties/desired/?$version=n``, an
AMQP device on its twin receiver link. Each adapter must read it back as ``Inbound("twin_desired")``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.amqp.emulator import AmqpFront
from adapters.amqp.transport import AmqpTransport
from adapters.http.emulator import HttpFront
from adapters.http.transport import HttpTransport
from adapters.mqtt.emulator import MqttFront
from adapters.mqtt.transport import MqttTransport
from gateway.codes import code_of
from gateway.emulator import Hub
from gateway.errors import IoTHubError
from gateway.transport import DesiredPatch, Inbound, PatchDesired, TransportEvent


def _plain(section: dict[str, object]) -> dict[str, object]:
    """A twin section without IoT Hub's ``$metadata`` (timestamps; ``tests/emulator`` checks it)."""
    return {k: v for k, v in section.items() if k != "$metadata"}

STEP = 5.0


pytestmark = pytest.mark.usefixtures("no_amqp_thread_left")


@pytest.fixture
async def http(hub: Hub) -> AsyncIterator[HttpFront]:
    front = HttpFront(hub)
    await asyncio.wait_for(front.start(), STEP)
    yield front
    await asyncio.wait_for(front.stop(), STEP)


@pytest.fixture
async def service(hub: Hub, http: HttpFront) -> AsyncIterator[HttpTransport]:
    t = HttpTransport(service_connection_string=http.service_connection_string, host="127.0.0.1", port=http.port, ssl=None, timeout=STEP)
    await asyncio.wait_for(t.connect(), STEP)
    yield t
    await asyncio.wait_for(t.close(), STEP)


@contextlib.asynccontextmanager
async def mqtt_device(hub: Hub, protocol: int, subscribe: tuple[str, ...] = ("twin",)) -> AsyncIterator[MqttTransport]:
    front = MqttFront(hub)
    await asyncio.wait_for(front.start(), STEP)
    t = MqttTransport(hub.connection_string("d1"), host="127.0.0.1", port=front.port, protocol=protocol, ssl=None,
                      connect_timeout=STEP, send_timeout=STEP, subscribe=subscribe)
    try:
        await asyncio.wait_for(t.connect(), STEP * 2)
        try:
            yield t
        finally:
            await asyncio.wait_for(t.close(), STEP * 2)
    finally:
        await asyncio.wait_for(front.stop(), STEP * 2)


@contextlib.asynccontextmanager
async def amqp_device(hub: Hub) -> AsyncIterator[AmqpTransport]:
    front = AmqpFront(hub)
    await asyncio.wait_for(front.start(), STEP)
    t = AmqpTransport.from_connection_string(hub.connection_string("d1"), host="127.0.0.1", port=front.port,
                                             ssl=None, send_timeout=STEP, connect_timeout=STEP, close_timeout=2.0,
                                             subscribe=("twin",))
    try:
        await asyncio.wait_for(t.connect(), STEP)
        try:
            yield t
        finally:
            await asyncio.wait_for(t.close(), STEP * 2)
    finally:
        await asyncio.wait_for(front.stop(), STEP * 3)


async def until(condition: Callable[[], bool]) -> None:
    """Wait (bounded) for something another thread does next."""
    async with asyncio.timeout(STEP):
        while not condition():
            await asyncio.sleep(0.01)


async def next_desired(events: AsyncIterator[TransportEvent]) -> dict[str, Any]:
    async with asyncio.timeout(STEP):
        async for event in events:
            if isinstance(event, Inbound) and event.kind == "twin_desired":
                assert event.device_id == "d1"
                assert isinstance(event.payload, DesiredPatch)
                return {"patch": dict(event.payload.patch), "version": event.payload.version}
    raise AssertionError("the event stream ended without a desired-property patch")


# -- MQTT ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [4, 5])
async def test_patch_reaches_mqtt_device(hub: Hub, service: HttpTransport, protocol: int) -> None:
    async with mqtt_device(hub, protocol) as t:
        assert hub.watches_desired("d1")  # subscribed before connect() returned (SUBACK awaited)
        events = t.events()
        twin = await service.update_twin("d1", {"fan": "on", "limits": {"max": 30}})
        assert _plain(twin["properties"]["desired"]) == {"fan": "on", "limits": {"max": 30}, "$version": 2}
        assert twin["version"] == 2 and twin["connectionState"] == "Connected"
        got = await next_desired(events)
        assert got == {"patch": {"fan": "on", "limits": {"max": 30}, "$version": 2}, "version": 2}
        # a null deletes the key in the twin, and reaches the device as the null it is
        await service.request(PatchDesired("d1", {"fan": None}), timeout=STEP)
        got = await next_desired(events)
        assert got == {"patch": {"fan": None, "$version": 3}, "version": 3}
        assert hub.device("d1").twin_desired == {"limits": {"max": 30}}  # type: ignore[union-attr]
    assert not hub.watches_desired("d1")  # the device left: nobody to tell


async def test_mqtt_device_without_desired_subscription_hears_nothing(hub: Hub, service: HttpTransport) -> None:
    async with mqtt_device(hub, 4, subscribe=("methods",)) as t:
        assert hub.is_online("d1") and not hub.watches_desired("d1")
        events = t.events()
        await service.update_twin("d1", {"fan": "on"})
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(next_desired(events), 0.3)
    assert hub.device("d1").twin_desired == {"fan": "on"}  # type: ignore[union-attr]


# -- AMQP ----------------------------------------------------------------------------------------------


async def test_patch_reaches_amqp_device(hub: Hub, service: HttpTransport) -> None:
    async with amqp_device(hub) as t:
        await until(lambda: hub.watches_desired("d1"))  # the subscription PUT follows the twin links
        events = t.events()
        twin = await service.update_twin("d1", {"fan": "on", "rate": 5})
        assert _plain(twin["properties"]["desired"]) == {"fan": "on", "rate": 5, "$version": 2}
        got = await next_desired(events)
        assert got == {"patch": {"fan": "on", "rate": 5, "$version": 2}, "version": 2}
        await service.update_twin("d1", {"rate": None})
        got = await next_desired(events)
        assert got == {"patch": {"rate": None, "$version": 3}, "version": 3}
        assert hub.device("d1").twin_desired == {"fan": "on"}  # type: ignore[union-attr]
    await until(lambda: not hub.watches_desired("d1"))


# -- the service endpoint ------------------------------------------------------------------------------


async def test_patch_without_subscriber_still_updates_the_twin(hub: Hub, service: HttpTransport) -> None:
    assert not hub.is_online("d2")
    answer = await service.request(PatchDesired("d2", {"a": 1, "b": {"c": 1, "d": 2}}),
                                   timeout=STEP)
    assert _plain(answer["properties"]["desired"]) == {"a": 1, "b": {"c": 1, "d": 2}, "$version": 2}
    await service.update_twin("d2", {"a": None, "b": {"c": None}, "missing": None})
    twin = await service.get_twin("d2")
    assert _plain(twin["properties"]["desired"]) == {"b": {"d": 2}, "$version": 3}
    assert twin["version"] == 3 and twin["connectionState"] == "Disconnected"


async def test_if_match_etag(hub: Hub, service: HttpTransport) -> None:
    etag = (await service.get_twin("d2"))["etag"]
    after = await service.update_twin("d2", {"a": 1}, etag=etag)
    assert after["properties"]["desired"]["a"] == 1
    with pytest.raises(IoTHubError) as info:
        await service.update_twin("d2", {"a": 2}, etag=etag)  # stale: the twin moved on
    assert info.value.code == code_of("PreconditionFailed")
    assert hub.device("d2").twin_desired == {"a": 1}  # type: ignore[union-attr]
    await service.update_twin("d2", {"a": 3}, etag="*")
    await service.update_twin("d2", {"a": 4}, etag=f'"{(await service.get_twin("d2"))["etag"]}"')
    assert hub.device("d2").twin_desired == {"a": 4}  # type: ignore[union-attr]


async def test_unknown_device_and_bad_requests(hub: Hub, service: HttpTransport) -> None:
    with pytest.raises(IoTHubError) as info:
        await service.update_twin("nobody", {"a": 1})
    assert info.value.code == code_of("DeviceNotFound")
    with pytest.raises(IoTHubError) as info:  # a desired value that is not JSON: refused before the wire
        await service.request(PatchDesired("d2", {"a": {1, 2}}), timeout=STEP)
    assert info.value.code == code_of("ArgumentInvalid")
    with pytest.raises(IoTHubError) as info:
        await service.update_twin("d2", {"a": object()})
    assert info.value.code == code_of("ArgumentInvalid")
    assert hub.device("d2").twin_version == 1  # type: ignore[union-attr]


async def test_patch_needs_the_service_credential_and_a_valid_body(hub: Hub, http: HttpFront) -> None:
    device_token = hub.token("d2", 2**31)
    async with aiohttp.ClientSession() as session:
        body = json.dumps({"properties": {"desired": {"a": 1}}})
        async with session.patch(f"{http.url}/twins/d2", data=body, headers={"Authorization": device_token}) as r:
            assert r.status == 401
        device_only = HttpTransport(hub.connection_string("d2"), host="127.0.0.1", port=http.port, ssl=None, timeout=STEP)
        await device_only.connect()
        try:
            with pytest.raises(IoTHubError) as info:
                await device_only.update_twin("d2", {"a": 1})
            assert info.value.code == code_of("InvalidOperation")
        finally:
            await device_only.close()
        svc = HttpTransport(service_connection_string=http.service_connection_string, host="127.0.0.1", port=http.port, ssl=None)
        token = svc._authorization(True)
        for bad in (b"not json", b"[1]", b'{"properties": {"desired": 3}}', b'{"properties": 3}'):
            async with session.patch(f"{http.url}/twins/d2", data=bad, headers={"Authorization": token}) as r:
                assert r.status == 400, bad
    assert hub.device("d2").twin_desired == {}  # type: ignore[union-attr]


async def test_fault_plan_applies_to_the_patch(hub: Hub, service: HttpTransport) -> None:
    hub.plan.add("twin_patch", code_of("ServiceUnavailable"), device="d2", transport="http")
    with pytest.raises(IoTHubError) as info:
        await service.update_twin("d2", {"a": 1})
    assert info.value.code == code_of("ServiceUnavailable")
    assert hub.device("d2").twin_desired == {}  # type: ignore[union-attr]
    await service.update_twin("d2", {"a": 1})
    assert hub.device("d2").twin_desired == {"a": 1}  # type: ignore[union-attr]


# -- the hub -------------------------------------------------------------------------------------------


def test_hub_listener_registry() -> None:
    hub = Hub()
    hub.add_device("d1")
    seen: list[tuple[dict[str, Any], int]] = []
    first, second = object(), object()
    hub.watch_desired("d1", first, lambda patch, version: seen.append((patch, version)))
    hub.watch_desired("d1", second, lambda patch, version: seen.append(({"second": patch}, version)))
    assert hub.update_desired("d1", {"a": {"b": 1}}) == 2
    assert seen == [({"second": {"a": {"b": 1}}}, 2)]  # the newest subscription wins
    seen[0][0]["second"]["a"]["b"] = 99  # the listener's copy is its own
    assert hub.device("d1").twin_desired == {"a": {"b": 1}}  # type: ignore[union-attr]
    hub.detach("d1", first)  # not the current subscriber: nothing changes
    assert hub.watches_desired("d1")
    hub.detach("d1", second)
    assert not hub.watches_desired("d1")
    assert hub.update_desired("d1", {"a": None}) == 3 and len(seen) == 1
    with pytest.raises(KeyError):
        hub.update_desired("nobody", {})


def test_hub_listener_failure_does_not_fail_the_update() -> None:
    hub = Hub()
    hub.add_device("d1")

    def broken(patch: dict[str, Any], version: int) -> None:
        raise RuntimeError("the front's loop is closed")

    hub.watch_desired("d1", object(), broken)
    assert hub.update_desired("d1", {"a": 1}) == 2
    assert hub.device("d1").twin_desired == {"a": 1}  # type: ignore[union-attr]


def test_hub_listener_is_called_outside_the_lock() -> None:
    hub = Hub()
    hub.add_device("d1")
    answers: list[bool] = []

    def listener(patch: dict[str, Any], version: int) -> None:
        # another thread must be able to use the hub while the listener runs
        t = threading.Thread(target=lambda: answers.append(hub.is_online("d1")))
        t.start()
        t.join(STEP)
        assert not t.is_alive()

    hub.watch_desired("d1", object(), listener)
    hub.update_desired("d1", {"a": 1})
    assert answers == [False]


_values = st.one_of(st.none(), st.integers(), st.text(max_size=5))
_patches = st.dictionaries(st.text(max_size=3), st.one_of(_values, st.dictionaries(st.text(max_size=3), _values,
                                                                                   max_size=3)), max_size=5)


def _no_nulls(value: Any) -> bool:
    return value is not None and (not isinstance(value, dict) or all(_no_nulls(v) for v in value.values()))


@given(st.lists(_patches, max_size=4))
def test_merge_properties(patches: list[dict[str, Any]]) -> None:
    hub = Hub()
    hub.add_device("d1")
    for i, patch in enumerate(patches):
        assert hub.update_desired("d1", patch) == i + 2
        desired = hub.device("d1").twin_desired  # type: ignore[union-attr]
        assert _no_nulls(desired)
        for key, value in patch.items():
            if value is None:
                assert key not in desired
            elif not isinstance(value, dict):
                assert desired[key] == value
            else:
                for inner, v in value.items():
                    assert (inner not in desired[key]) if v is None else desired[key][inner] == v
