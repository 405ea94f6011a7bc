"""Bursts over TLS: many answers arrive in few TLS records, and the client must read them all.

IoT Hub is always TLS, and a burst of twin answers or cloud-to-device messages can arrive faster than
they are read; decrypted bytes then wait inside the TLS layer where a socket-readiness loop never looks.
1,000 twin requests in flight at once, and 1,000 C2D messages pushed through IoT Hub's 50-message queue
and settled by the app, must all complete.
"""

from __future__ import annotations

import asyncio

from gateway.handler import Handler
from gateway.transport import C2DMessage, GetTwin, Inbound, PatchReported, SettleC2D
from tests.scenarios.conftest import Stage, fast_policy
from tests.scenarios.kit import transport_for, until

N = 1000


async def test_a_thousand_twin_requests_in_flight_over_tls_all_complete(stage: Stage) -> None:
    stage.hub.update_reported("d1", {"fw": "1.0"})
    transport = transport_for(stage, "mqtt311", subscribe=("twin",))
    async with Handler(transport, policy=fast_policy(0.01), identity="d1") as handler:
        await handler.wait_connected(timeout=10)
        twins = await asyncio.wait_for(
            asyncio.gather(*(handler.request(GetTwin(), timeout=60) for _ in range(N))), 120)
        versions = await asyncio.wait_for(
            asyncio.gather(*(handler.request(PatchReported({"n": i}), timeout=60) for i in range(100))), 60)
    assert len(twins) == N and all(t["reported"]["fw"] == "1.0" for t in twins)
    assert sorted(v for v in versions if v is not None) == sorted(set(v for v in versions if v is not None))


async def test_a_thousand_c2d_messages_over_tls_reach_the_app_and_are_settled(stage: Stage) -> None:
    seen: list[str] = []
    settles: set[asyncio.Task[object]] = set()
    handler: Handler | None = None

    def on_inbound(event: Inbound) -> None:
        assert handler is not None
        if isinstance(event.payload, C2DMessage):
            seen.append(event.payload.message_id or "")
            task = asyncio.ensure_future(handler.request(SettleC2D.of(event.payload), timeout=30))
            settles.add(task)
            task.add_done_callback(settles.discard)

    transport = transport_for(stage, "mqtt311", subscribe=("c2d",))
    async with Handler(transport, policy=fast_policy(0.01), identity="d1", on_inbound=on_inbound) as h:
        handler = h
        await h.wait_connected(timeout=10)
        for i in range(N):  # keep the hub's 50-message queue full while the app drains it
            while True:
                try:
                    stage.hub.send_c2d("d1", f"command {i}".encode(), message_id=f"c{i}")
                    break
                except OverflowError:
                    await asyncio.sleep(0.005)
        assert await until(lambda: len(set(seen)) == N and not settles, timeout=120), (len(set(seen)), len(settles))
    assert set(seen) == {f"c{i}" for i in range(N)}
    assert stage.hub.lock_c2d("d1", 60, 0) is None  # nothing left queued or redelivered
