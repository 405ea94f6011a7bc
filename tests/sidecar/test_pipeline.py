"""The delivery pipeline's claim-ahead: the next send starts as a slot frees; what was claimed ahead and
never sent goes back to pending unflagged at shutdown (only the sends cut short are possible duplicates)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gateway.outbox import Outbox
from tests.sidecar.fakes import Upstream, fake_config


async def test_claimed_ahead_messages_return_unflagged_and_sends_cut_short_flagged(tmp_path: Path,
                                                                                start_sidecar: Any):
    up = Upstream(block=asyncio.Event())  # every send waits: the hub never acknowledges
    config = fake_config(tmp_path, ("dev-mqtt", "mqtt"), delivery={"max_inflight": 2, "shutdown_deadline": 0.2})
    run = await start_sidecar(config, up)
    ids = []
    for i in range(8):
        resp = await run.client.post("/v1/devices/dev-mqtt/messages", data=f"m{i}".encode())
        ids.append((await resp.json())["id"])
    pipeline = run.sidecar.pipelines["dev-mqtt"]
    # two sends in flight, at most max_inflight more claimed ahead, the rest pending
    await run.wait_for(lambda: len(pipeline._tasks) == 2 and len(pipeline._ready) == 2)
    counts = run.sidecar.outbox.counts("dev-mqtt")
    assert counts["inflight"] == 4 and counts["pending"] == 4
    sending = {t.get_name().removeprefix("send-") for t in pipeline._tasks}
    ahead = {item.id for item in pipeline._ready}
    assert sending | ahead == set(ids[:4])  # oldest first
    await run.sidecar.stop()

    box = Outbox(str(tmp_path / "outbox.sqlite3"))
    try:
        items = {i: box.get(i) for i in ids}
        assert all(item is not None and item.status == "pending" for item in items.values())
        flagged = {i for i, item in items.items() if item is not None and item.possible_duplicate}
        assert flagged == sending  # cut short while sending: maybe at the hub; never sent: not flagged
    finally:
        box.close()


async def test_acknowledgements_are_written_in_groups_and_each_is_announced_once(tmp_path: Path,
                                                                                start_sidecar: Any):
    up = Upstream(block=asyncio.Event())  # the hub holds every acknowledgement until released
    run = await start_sidecar(fake_config(tmp_path, ("dev-mqtt", "mqtt"), delivery={"max_inflight": 8}), up)
    outbox = run.sidecar.outbox
    groups: list[int] = []
    write = outbox.delivered_many

    async def counted(acks: Any) -> list[bool]:  # passes through: only notes how many each write carries
        groups.append(len(acks))
        return await write(acks)

    outbox.delivered_many = counted  # type: ignore[method-assign]
    announced: list[str] = []
    stream = run.sidecar.events.subscribe()

    async def listen() -> None:
        async for _, kind, data in stream:
            if kind == "delivered":
                announced.append(data["id"])

    listener = asyncio.ensure_future(listen())
    ids = []
    for i in range(20):
        ids.append((await (await run.client.post("/v1/devices/dev-mqtt/messages", data=f"m{i}".encode())).json())["id"])
    await run.wait_for(lambda: len(run.sidecar.pipelines["dev-mqtt"]._tasks) == 8)
    up.block.set()  # type: ignore[union-attr]  # eight acknowledgements in one turn of the loop
    await run.wait_for(lambda: outbox.counts("dev-mqtt")["delivered"] == 20 and len(announced) == 20)
    listener.cancel()
    assert sorted(announced) == sorted(ids)  # every delivery announced once, none twice
    assert [m.id for m in up.received] == ids  # sent in order
    assert sum(groups) == 20 and max(groups) >= 8 and len(groups) < 20  # grouped: fewer writes than messages


async def test_delivered_many_settles_each_and_says_which_were_open(tmp_path: Path, start_sidecar: Any):
    up = Upstream(block=asyncio.Event())
    run = await start_sidecar(fake_config(tmp_path, ("dev-mqtt", "mqtt"), delivery={"max_inflight": 2}), up)
    a = (await (await run.client.post("/v1/devices/dev-mqtt/messages", data=b"a")).json())["id"]
    b = (await (await run.client.post("/v1/devices/dev-mqtt/messages", data=b"b")).json())["id"]
    outbox = run.sidecar.outbox
    await run.wait_for(lambda: outbox.counts("dev-mqtt")["inflight"] == 2)
    assert await outbox.delivered_many([(a, 1.0, False), (b, 2.0, True), ("nope", 3.0, False)]) == [True, True, False]
    item = outbox.get(b)
    assert item is not None and item.status == "delivered" and item.possible_duplicate
    up.block.set()  # type: ignore[union-attr]
