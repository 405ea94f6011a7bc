"""The delivery pipeline's claim-ahead: the next send starts as a slot frees; a backlog is claimed in large
groups within a budget all devices share; what was claimed ahead and never sent goes back to pending
unflagged at shutdown (only the sends cut short are possible duplicates)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.outbox import Outbox
from gateway.sidecar.upstream import rfc3339
from tests.sidecar.fakes import Upstream, fake_config


async def test_claimed_ahead_messages_return_unflagged_and_sends_cut_short_flagged(tmp_path: Path,
                                                                                start_sidecar: Any):
    up = Upstream(block=asyncio.Event())  # every send waits: the hub never acknowledges
    config = fake_config(tmp_path, ("dev-mqtt", "mqtt"),
                         delivery={"max_inflight": 2, "shutdown_deadline": 0.2, "claim_ahead": 0})
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


async def test_a_backlog_is_claimed_far_ahead_within_the_shared_budget_and_given_back(tmp_path: Path,
                                                                                   start_sidecar: Any):
    stored = Outbox(str(tmp_path / "outbox.sqlite3"))  # a backlog left by an earlier run (the hub was away)
    with stored.transaction():
        for device in ("dev-a", "dev-b"):
            for i in range(40):
                stored.put(device, f"{device}-{i}".encode(), now=0)
    stored.close()
    up = Upstream(block=asyncio.Event())
    config = fake_config(tmp_path, ("dev-a", "mqtt"), ("dev-b", "mqtt"),
                         delivery={"max_inflight": 2, "claim_ahead": 20, "claim_budget": 30})
    run = await start_sidecar(config, up)
    a, b = run.sidecar.pipelines["dev-a"], run.sidecar.pipelines["dev-b"]
    outbox = run.sidecar.outbox

    def claimed(device: str) -> int:
        return outbox.counts(device)["inflight"]

    # each device: 2 sending and 2 ahead of its own, plus what it borrowed: 20 at most each, 30 for both
    await run.wait_for(lambda: claimed("dev-a") + claimed("dev-b") == 8 + 30)
    assert a._borrowed + b._borrowed == 30 and a._borrowed <= 20 and b._borrowed <= 20
    assert claimed("dev-a") == 4 + a._borrowed and claimed("dev-b") == 4 + b._borrowed
    up.block.set()  # type: ignore[union-attr]
    await run.wait_for(lambda: outbox.counts()["delivered"] == 80)
    await run.wait_for(lambda: a._borrowed == 0 and b._borrowed == 0)  # given back as the backlogs drained
    assert a._budget is b._budget and a._budget.free == 30
    sent = [m.body.decode() for m in up.received]
    assert [x for x in sent if x.startswith("dev-a")] == [f"dev-a-{i}" for i in range(40)]  # in order


async def test_acknowledgements_of_a_busy_pipeline_are_written_in_few_commits(tmp_path: Path,
                                                                             start_sidecar: Any):
    stored = Outbox(str(tmp_path / "outbox.sqlite3"))  # a backlog: sends keep coming back while acks are written
    with stored.transaction():
        for i in range(300):
            stored.put("dev-mqtt", f"m{i}".encode(), now=0)
    stored.close()
    up = Upstream(block=asyncio.Event())
    run = await start_sidecar(fake_config(tmp_path, ("dev-mqtt", "mqtt"), delivery={"max_inflight": 8}), up)
    outbox = run.sidecar.outbox
    groups: list[int] = []
    write = outbox.delivered_many

    async def counted(acks: Any) -> list[bool]:
        groups.append(len(acks))
        return await write(acks)

    outbox.delivered_many = counted  # type: ignore[method-assign]
    up.block.set()  # type: ignore[union-attr]
    await run.wait_for(lambda: outbox.counts("dev-mqtt")["delivered"] == 300)
    assert sum(groups) == 300
    assert len(groups) <= 300 / 4, groups  # gathered while sends came back, not one write per acknowledgement


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(min_value=-1e9, max_value=4e10, allow_nan=False),
                 st.integers(min_value=0, max_value=4 * 10**9).map(lambda s: s + 0.9995),
                 st.integers(min_value=0, max_value=4 * 10**9).map(lambda s: s + 0.9999996)))
def test_rfc3339_formats_as_datetime_does(epoch: float) -> None:
    expected = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert rfc3339(epoch) == expected


async def test_claimed_ahead_messages_go_back_to_pending_when_the_link_drops(tmp_path: Path, start_sidecar: Any):
    """Held in memory through an outage they would be out of reach of the deadline sweep and, after a
    crash, flagged as possible duplicates though never sent: the link's loss hands them back."""
    from gateway.codes import code_of
    from gateway.errors import make_error
    from gateway.handler import State

    stored = Outbox(str(tmp_path / "outbox.sqlite3"))
    with stored.transaction():
        for i in range(60):
            stored.put("dev-mqtt", f"m{i}".encode(), now=0)
    stored.close()
    up = Upstream(block=asyncio.Event())
    run = await start_sidecar(fake_config(tmp_path, ("dev-mqtt", "mqtt"),
                                          delivery={"max_inflight": 2, "claim_ahead": 20, "claim_budget": 100}), up)
    pipeline, outbox = run.sidecar.pipelines["dev-mqtt"], run.sidecar.outbox
    await run.wait_for(lambda: outbox.counts("dev-mqtt")["inflight"] == 4 + 20)  # 2 sending, 22 ahead
    up.transports["dev-mqtt"].drop(make_error(code_of("ServiceUnavailable"), transport="mqtt"))
    await run.wait_for(lambda: pipeline.handler.state is not State.CONNECTED)
    # at most the two sends stay in flight; what was claimed ahead is pending again, unflagged
    await run.wait_for(lambda: outbox.counts("dev-mqtt")["inflight"] <= 2 and not pipeline._ready)
    assert pipeline._borrowed == 0 and pipeline._budget.free == 100
    stored = Outbox(str(tmp_path / "outbox.sqlite3"))
    items = list(stored)
    stored.close()
    flagged = {item.body.decode() for item in items if item.possible_duplicate}
    assert flagged <= {"m0", "m1"}  # only the sends cut short by the drop may have reached the hub
    assert sum(item.status == "pending" for item in items) >= 58
    up.block.set()  # type: ignore[union-attr]
    await run.wait_for(lambda: outbox.counts("dev-mqtt")["delivered"] >= 60, timeout=30)
    sent = [m.body.decode() for m in up.received]
    assert [x for x in dict.fromkeys(sent)] == [f"m{i}" for i in range(60)]  # in order (a resend may repeat one)
