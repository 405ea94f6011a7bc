"""The sidecar's storage through its API: failures that are real (a lock held by another connection, a
corrupt file) answer 503 with a code and heal by themselves; dead letters are readable and replayable;
retention takes delivered messages out of the file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.codes import code_of
from gateway.errors import make_error
from gateway.sidecar.config import ConfigError, default_outbox_path, parse_config
from tests.sidecar.fakes import Running, Upstream, fake_config

UNAVAILABLE = code_of("ServiceUnavailable")


async def _storage_503(resp: Any, kind: str) -> None:
    assert resp.status == 503, await resp.text()
    body = await resp.json()
    assert body["errorCode"] == UNAVAILABLE and resp.headers["iothub-errorcode"] == "ServiceUnavailable"
    assert int(resp.headers["Retry-After"]) >= 1 and kind in body["message"]


async def _ready_again(run: Running, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while (await run.client.get("/readyz")).status != 200:
            await asyncio.sleep(0.1)


async def _delivered(run: Running, mid: str) -> None:
    await run.wait_for(lambda: (item := run.sidecar.outbox.get(mid)) is not None and item.status == "delivered")


async def test_a_locked_outbox_answers_503_with_a_code_and_delivery_resumes(tmp_path: Path, start_sidecar: Any):
    cfg = fake_config(tmp_path)
    run = await start_sidecar(cfg)
    first = (await (await run.client.post("/v1/devices/dev-mqtt/messages", data=b"1")).json())["id"]
    await _delivered(run, first)
    other = sqlite3.connect(cfg.outbox_path(), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another program holds the outbox's write lock
    try:
        await _storage_503(await run.client.post("/v1/devices/dev-mqtt/messages", data=b"2"), "locked")
        ready = await run.client.get("/readyz")
        body = await ready.json()
        assert ready.status == 503 and body["storage"]["code"] == UNAVAILABLE and body["storage"]["kind"] == "locked"
        device = await (await run.client.get("/v1/devices/dev-mqtt")).json()
        assert device["storage"]["name"] == "ServiceUnavailable"
        assert (await run.client.get("/healthz")).status == 200  # alive, just not ready
        assert "iothub_gateway_outbox_up 0.0" in await (await run.client.get("/metrics")).text()
    finally:
        other.execute("ROLLBACK")
        other.close()
    await _ready_again(run)  # nobody posted: the sidecar found out by itself
    resp = await run.client.post("/v1/devices/dev-mqtt/messages", data=b"3")
    assert resp.status == 202
    await _delivered(run, (await resp.json())["id"])
    device = await (await run.client.get("/v1/devices/dev-mqtt")).json()
    assert device["storage"] is None and device["messages"]["delivered"] == 2
    stream = await run.client.get("/v1/events?after=0")  # the event stream told both turns, with the code
    told: list[dict[str, Any]] = []
    async with asyncio.timeout(5):
        while not any(e["state"] == "ok" for e in told):
            if (await stream.content.readline()).decode().startswith("event: storage"):
                told.append(json.loads((await stream.content.readline()).decode()[len("data: "):]))
    stream.close()
    assert told[0]["state"] == "failed" and told[0]["code"] == UNAVAILABLE and told[0]["kind"] == "locked"


async def test_a_corrupt_outbox_at_start_is_visible_and_replaced_once_moved_away(tmp_path: Path,
                                                                                  start_sidecar: Any):
    cfg = fake_config(tmp_path)
    path = cfg.outbox_path()
    path.write_bytes(b"not a database; a backup tool wrote over it " * 200)
    run = await start_sidecar(cfg)
    ready = await run.client.get("/readyz")
    assert ready.status == 503 and (await ready.json())["storage"]["kind"] == "corrupt"
    await _storage_503(await run.client.post("/v1/devices/dev-http/messages", data=b"x"), "corrupt")
    path.rename(path.with_suffix(".corrupt"))  # the operator keeps it aside for later
    await _ready_again(run)
    resp = await run.client.post("/v1/devices/dev-http/messages", data=b"x")
    assert resp.status == 202
    await _delivered(run, (await resp.json())["id"])


async def test_dead_letters_can_be_read_and_replayed(tmp_path: Path, start_sidecar: Any):
    up = Upstream(send_script={"dev-http": [make_error(400004, transport="http", message="bad property")]})
    run = await start_sidecar(fake_config(tmp_path), up)
    resp = await run.client.post("/v1/devices/dev-http/messages", data='{"t": "é"}'.encode(),
                                 headers={"iothub-app-room": "kitchen"})
    mid = (await resp.json())["id"]
    await run.wait_for(lambda: run.sidecar.outbox.get(mid).status == "dead")  # type: ignore[union-attr]
    dead = await (await run.client.get(f"/v1/dead-letters/{mid}")).json()
    assert dead["body"] == '{"t": "é"}' and dead["properties"] == {"room": "kitchen"}
    assert dead["code"] == 400004 and dead["name"] == "ArgumentInvalid" and dead["status"] == "dead"
    replayed = await run.client.post(f"/v1/dead-letters/{mid}/replay")
    assert replayed.status == 202 and replayed.headers["Location"] == f"/v1/messages/{mid}"
    view = await replayed.json()
    assert view["id"] == mid and view["status"] == "pending" and view["code"] is None
    await _delivered(run, mid)
    sent = [m for m in up.received if m.id == mid]
    assert len(sent) == 1 and sent[0].body == '{"t": "é"}'.encode() and dict(sent[0].properties) == {"room": "kitchen"}
    assert run.sidecar.outbox.get(mid).attempts == 2  # type: ignore[union-attr]  # a new attempt, the same id
    for path in (f"/v1/dead-letters/{mid}", "/v1/dead-letters/no-such-id"):
        gone = await run.client.get(path)
        assert gone.status == 404 and (await gone.json())["errorCode"] == 404000
    again = await run.client.post(f"/v1/dead-letters/{mid}/replay")  # delivered, not dead: nothing to replay
    assert again.status == 404


async def test_retention_takes_delivered_messages_out_but_keeps_the_totals(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path, outbox={"delivered_retention": 0.0}))
    ids = [(await (await run.client.post("/v1/devices/dev-mqtt/messages", data=b"x")).json())["id"]
           for _ in range(3)]
    async with asyncio.timeout(10):
        while [(await run.client.get(f"/v1/messages/{mid}")).status for mid in ids] != [404] * 3:
            await asyncio.sleep(0.1)  # the once-a-second sweep removes them
    device = await (await run.client.get("/v1/devices/dev-mqtt")).json()
    assert device["messages"]["delivered"] == 3 and device["queued"] == 0
    assert len(run.upstream.received) == 3
    with sqlite3.connect(run.sidecar.config.outbox_path()) as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


async def test_counts_and_metrics_never_query_the_messages(tmp_path: Path, start_sidecar: Any):
    """The counts are kept as rows change: a scrape or a device listing reads memory, not the table."""
    run = await start_sidecar(fake_config(tmp_path))
    ids = [(await (await run.client.post("/v1/devices/dev-mqtt/messages", data=b"x")).json())["id"]
           for _ in range(5)]
    for mid in ids:
        await _delivered(run, mid)
    seen: list[str] = []
    store = run.sidecar.outbox.store
    for db in (store._db, store._rdb):
        assert db is not None
        db.set_trace_callback(seen.append)
    for path in ("/metrics", "/v1/devices", "/v1/devices/dev-mqtt", "/readyz", "/metrics"):
        assert (await run.client.get(path)).status == 200
    text = await (await run.client.get("/metrics")).text()
    assert 'iothub_gateway_outbox_messages{status="delivered"} 5.0' in text
    assert "iothub_gateway_outbox_up 1.0" in text and "iothub_gateway_outbox_file_bytes" in text
    reads = [s for s in seen if s.lstrip().upper().startswith("SELECT") and "messages" in s]
    assert reads == []


def test_retention_settings_are_validated_and_the_default_path_is_per_config(tmp_path: Path) -> None:
    cfg = parse_config({"outbox": {"delivered_retention": 60, "delivered_max": 0, "dead_letter_retention": 3600.5,
                                   "dead_letter_max": 7}}, env={})
    o = cfg.outbox
    assert (o.delivered_retention, o.delivered_max, o.dead_letter_retention, o.dead_letter_max) == (60, 0, 3600.5, 7)
    with pytest.raises(ConfigError) as caught:
        parse_config({"outbox": {"delivered_retention": -1, "dead_letter_max": 1.5}}, env={})
    assert any("[outbox] delivered_retention" in p for p in caught.value.problems)
    assert any("[outbox] dead_letter_max" in p for p in caught.value.problems)
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    assert default_outbox_path(str(a)) != default_outbox_path(str(b))
    assert default_outbox_path(str(a)) == default_outbox_path(str(tmp_path / "." / "a.toml"))  # the same file
    assert default_outbox_path(None) == default_outbox_path("<defaults>")
