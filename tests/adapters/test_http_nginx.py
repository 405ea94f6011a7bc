"""The HTTP adapter through a real reverse proxy (a private nginx) in front of the emulator.

These are the non-IoT-Hub answers a real deployment meets: the proxy's own 502, 504 and 413, with
HTML bodies and no IoT Hub code. They must come out as the status family with ``exact=False``, while
IoT Hub's own answers pass through the proxy unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from adapters.http.emulator import HttpFront
from adapters.http.transport import HttpTransport
from gateway.emulator import Hub
from gateway.errors import IoTHubError, RequestError, ServerError
from gateway.transport import Message
from tests.peers.nginx import NginxProxy

T = TypeVar("T")


async def bounded(aw: Awaitable[T], seconds: float = 10.0) -> T:
    async with asyncio.timeout(seconds):
        return await aw


async def failure(aw: Awaitable[Any], seconds: float = 10.0) -> IoTHubError:
    with pytest.raises(IoTHubError) as info:
        await bounded(aw, seconds)
    return info.value


@dataclass
class Proxied:
    hub: Hub
    front: HttpFront
    proxy: NginxProxy
    transport: HttpTransport


@pytest.fixture
async def proxied(nginx_proxy: Callable[..., NginxProxy]) -> AsyncIterator[Proxied]:
    hub = Hub()
    hub.add_device("d1")
    front = HttpFront(hub)
    await bounded(front.start())
    proxy = nginx_proxy(front.port, max_body="1k", read_timeout="1s")
    transport = HttpTransport(hub.connection_string("d1"), host="127.0.0.1", port=proxy.port, ssl=None, timeout=8.0)
    await bounded(transport.connect())
    yield Proxied(hub, front, proxy, transport)
    await bounded(transport.close())
    await bounded(front.stop())


async def test_requests_pass_through_and_hub_codes_stay_exact(proxied: Proxied) -> None:
    await bounded(proxied.transport.send(Message("m1", "d1", b"x")))
    assert proxied.hub.received_ids() == ["m1"]
    proxied.hub.plan.add("telemetry", 429001, retry_after=3, form="escaped")
    err = await failure(proxied.transport.send(Message("m2", "d1", b"x")))
    assert (err.code, err.exact, err.retry_after) == (429001, True, 3)


async def test_emulator_stopped_is_the_proxys_502(proxied: Proxied) -> None:
    await bounded(proxied.front.stop())
    err = await failure(proxied.transport.send(Message("m1", "d1", b"x")))
    assert (err.code, err.exact, err.http_status) == (502000, False, 502)
    assert isinstance(err, ServerError) and err.retryable
    assert "nginx" in err.native["body_excerpt"]


async def test_emulator_slow_is_the_proxys_504(proxied: Proxied) -> None:
    proxied.hub.plan.add("telemetry", kind="delay", delay=5)  # longer than proxy_read_timeout 1s
    err = await failure(proxied.transport.send(Message("m1", "d1", b"x")))
    assert (err.code, err.exact, err.http_status) == (504000, False, 504)
    assert err.retryable


async def test_request_larger_than_the_proxy_allows_is_413_from_the_proxy(proxied: Proxied) -> None:
    err = await failure(proxied.transport.send(Message("m1", "d1", b"x" * 8192)))
    assert (err.code, err.exact, err.http_status) == (413000, False, 413)  # not IoT Hub's MessageTooLarge
    assert isinstance(err, RequestError) and not err.retryable
    assert proxied.hub.received == []  # it never reached the hub


async def test_the_hubs_own_413_passes_a_roomier_proxy_exact(nginx_proxy: Callable[..., NginxProxy]) -> None:
    hub = Hub()
    hub.add_device("d1")
    front = HttpFront(hub)
    await bounded(front.start())
    proxy = nginx_proxy(front.port, max_body="2m")
    transport = HttpTransport(hub.connection_string("d1"), host="127.0.0.1", port=proxy.port, ssl=None, timeout=8.0)
    try:
        await bounded(transport.connect())
        err = await failure(transport.send(Message("m1", "d1", b"x" * 300_000)))
    finally:
        await bounded(transport.close())
        await bounded(front.stop())
    assert (err.code, err.exact, err.name) == (413001, True, "MessageTooLarge")
