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
