"""``POST /v1/devices/{id}/messages/batch``: many messages in one request, validated as a whole and stored
in one outbox write (all or nothing), each answered as the single POST answers it. Real sidecars over
loopback: the bundled emulator for the happy path, the in-memory upstream for the refusals."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.codes import code_of
from gateway.outbox import Outbox
from tests.fuzz.hostile import json_like
from tests.fuzz.test_api_fuzz import API_FUZZ, assert_coded_answer
from tests.sidecar.fakes import Running, Upstream, fake_config

ARGUMENT = code_of("ArgumentInvalid")
TOO_LARGE = code_of("MessageTooLarge")
THROTTLED = code_of("ThrottlingException")
UNAVAILABLE = code_of("ServiceUnavailable")
NO_DEVICE = code_of("DeviceNotFound")
BATCH = "/v1/devices/dev-mqtt/messages/batch"


def _stored(run: Running) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """Every row of the outbox, read from the file (what a refusal must leave unchanged)."""
    return [(i.id, i.device_id, i.body, i.properties) for i in run.sidecar.outbox.store]


def _counted(text: str, outcome: str = "rejected") -> float:
    """The metrics' count of messages with this outcome (all transports and codes)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("iothub_gateway_messages_total{") and f'outcome="{outcome}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _refused(resp: Any, status: int, code: int, *fragments: str) -> dict[str, Any]:
    raw = await resp.read()
    assert resp.status == status, raw[:500]
    assert_coded_answer(resp.status, resp.headers, raw)
    body: dict[str, Any] = json.loads(raw)
    assert body["code"] == code and body["transport"] == "api", body
    for fragment in fragments:
        assert fragment in body["message"], (fragment, body["message"])
    return body


# -- the happy path, over the real wires to the bundled emulator --------------------------------------------

@pytest.mark.parametrize("protocol", ["mqtt", "amqp", "http"])
async def test_a_mixed_batch_reaches_the_hub_intact_and_in_order(emulated_sidecar: Any, protocol: str):
    # one message in flight at a time: the hub sees the outbox's order (the batch's) whatever the transport
    sidecar, client = await emulated_sidecar({"delivery": {"max_inflight": 1}})
    device = f"demo-{protocol}"
    batch = {"messages": [
        {"body": "text é", "properties": {"site": "a", "line": "7"}, "message_id": f"b-{protocol}-1",
         "content_type": "text/plain; charset=utf-8", "content_encoding": "utf-8"},
        {"body": {"temperature": 21.5, "ok": True}, "correlation_id": "corr-9",
         "creation_time": "2026-01-31T12:00:00Z"},
        {"body_base64": base64.b64encode(b"\x00\x01\x02\xff").decode(), "content_type": "application/octet-stream"},
        {"body": [1, "two", None], "content_type": "application/vnd.x+json", "content_encoding": "utf-8"},
    ]}
    resp = await client.post(f"/v1/devices/{device}/messages/batch", json=batch)
    assert resp.status == 202, await resp.text()
    answers = (await resp.json())["messages"]
    assert [a["status"] for a in answers] == ["pending"] * 4 and not any(a["duplicate"] for a in answers)
    assert answers[0]["id"] == f"b-{protocol}-1" and all(a["device_id"] == device for a in answers)
    ids = [a["id"] for a in answers]
    for mid in ids:  # durable before the answer
        assert sidecar.outbox.get(mid) is not None
    hub = sidecar.emulator.hub
    async with asyncio.timeout(20):
        while not set(ids) <= set(hub.received_ids(device)):
            await asyncio.sleep(0.02)
    got = [r for r in hub.received if r.device_id == device and r.message_id in ids]
    assert [r.message_id for r in got] == ids  # in the batch's order
    text, obj, binary, array = got
    assert text.body == "text é".encode() and text.properties == {"site": "a", "line": "7"}
    assert text.system["$.ct"] == "text/plain; charset=utf-8" and text.system["$.ce"] == "utf-8"
    assert obj.body == b'{"temperature":21.5,"ok":true}' and obj.system["$.ct"] == "application/json"
    assert obj.system["$.cid"] == "corr-9" and obj.system["$.ctime"] == "2026-01-31T12:00:00Z"
    assert binary.body == b"\x00\x01\x02\xff" and binary.system["$.ct"] == "application/octet-stream"
    assert array.body == b'[1,"two",null]' and array.system["$.ct"] == "application/vnd.x+json"
    assert text.system["$.ctime"].endswith("Z")  # the time the batch was accepted
    for received in got[1:]:
        assert received.properties == {}  # system properties never leak into the app's


# -- refusals: the right status and code, nothing stored -----------------------------------------------------

def _messages(*items: Any) -> bytes:
    return json.dumps({"messages": list(items)}).encode()


OK = {"body": "fine"}
REFUSALS: list[tuple[str, bytes, int, int, tuple[str, ...]]] = [
    ("not-json", b"{oops", 400, ARGUMENT, ("not valid JSON",)),
    ("nan", b'{"messages": [{"body": NaN}]}', 400, ARGUMENT, ("NaN",)),
    ("not-utf8", b'{"messages": [{"body": "\xff"}]}', 400, ARGUMENT, ("not valid JSON",)),
    ("not-an-object", b'[{"body": "x"}]', 400, ARGUMENT, ("JSON object",)),
    ("unknown-top-key", b'{"messages": [{"body": "x"}], "mesages": []}', 400, ARGUMENT, ("'mesages'",)),
    ("messages-missing", b"{}", 400, ARGUMENT, ("messages: must be a non-empty list",)),
    ("messages-empty", _messages(), 400, ARGUMENT, ("messages: must be a non-empty list",)),
    ("messages-not-a-list", b'{"messages": {"body": "x"}}', 400, ARGUMENT, ("messages: must be a non-empty list",)),
    ("too-many", _messages(*[OK] * 4), 400, ARGUMENT, ("messages: 4 messages; at most 3",)),
    ("message-not-an-object", _messages(OK, "x"), 400, ARGUMENT, ("messages[1]: must be a message object",)),
    ("unknown-key", _messages(OK, {"bdy": "x"}), 400, ARGUMENT, ("messages[1]: unknown key(s) 'bdy'",)),
    ("both-bodies", _messages({"body": "x", "body_base64": "eA=="}), 400, ARGUMENT,
     ("messages[0]: needs exactly one of body and body_base64",)),
    ("no-body", _messages({"message_id": "m"}), 400, ARGUMENT, ("messages[0]: needs exactly one",)),
    ("base64-padding", _messages({"body_base64": "AAE"}), 400, ARGUMENT, ("messages[0].body_base64: not strict",)),
    ("base64-whitespace", _messages({"body_base64": "AA E="}), 400, ARGUMENT, ("messages[0].body_base64",)),
    ("base64-alphabet", _messages({"body_base64": "@@@@"}), 400, ARGUMENT, ("messages[0].body_base64",)),
    ("base64-not-text", _messages({"body_base64": 5}), 400, ARGUMENT, ("messages[0].body_base64",)),
    ("base64-non-ascii", _messages({"body_base64": "ééé="}), 400, ARGUMENT, ("messages[0].body_base64",)),
    ("lone-surrogate", b'{"messages": [{"body": "\\ud800"}]}', 400, ARGUMENT, ("messages[0].body: ",)),
    ("lone-surrogate-inside", b'{"messages": [{"body": {"a": "\\udfff"}}]}', 400, ARGUMENT, ("messages[0].body",)),
    ("body-too-large", _messages(OK, {"body": "x" * 101}), 413, TOO_LARGE, ("messages[1].body: 101 bytes",)),
    ("json-body-too-large", _messages({"body": ["x" * 100]}), 413, TOO_LARGE, ("messages[0].body: 104 bytes",)),
    ("base64-too-large", _messages({"body_base64": base64.b64encode(b"x" * 101).decode()}), 413, TOO_LARGE,
     ("messages[0].body_base64",)),
    ("json-type-not-json", _messages({"body": "not json", "content_type": "application/json"}), 400, ARGUMENT,
     ("messages[0].body: not valid JSON",)),
    ("json-type-base64", _messages({"body_base64": "/w==", "content_type": "Application/JSON; charset=utf-8"}), 400,
     ARGUMENT, ("messages[0].body_base64: not valid JSON",)),
    ("properties-not-object", _messages({"body": "x", "properties": [["a", "b"]]}), 400, ARGUMENT,
     ("messages[0].properties: must be an object",)),
    ("property-not-string", _messages({"body": "x", "properties": {"a": 1}}), 400, ARGUMENT,
     ("messages[0].properties: names and values must be strings",)),
    ("property-dollar", _messages(OK, OK, {"body": "x", "properties": {"$.ct": "x"}}), 400, ARGUMENT,
     ("messages[2].properties: names must not start with '$'",)),
    ("property-empty-name", _messages({"body": "x", "properties": {"": "x"}}), 400, ARGUMENT,
     ("messages[0].properties: names must not be empty",)),
    ("property-surrogate", b'{"messages": [{"body": "x", "properties": {"\\ud800": "v"}}]}', 400, ARGUMENT,
     ("messages[0].properties: names and values must be UTF-8",)),
    ("too-many-properties", _messages({"body": "x", "properties": {f"p{i}": "v" for i in range(65)}}), 400,
     ARGUMENT, ("messages[0].properties: at most 64",)),
    ("message-id-space", _messages({"body": "x", "message_id": "a b"}), 400, ARGUMENT,
     ("messages[0].message_id: must be 1-128 printable ASCII",)),
    ("message-id-empty", _messages({"body": "x", "message_id": ""}), 400, ARGUMENT, ("messages[0].message_id",)),
    ("message-id-long", _messages({"body": "x", "message_id": "m" * 129}), 400, ARGUMENT, ("messages[0].message_id",)),
    ("message-id-number", _messages({"body": "x", "message_id": 5}), 400, ARGUMENT, ("messages[0].message_id",)),
    ("content-type-non-ascii", _messages({"body": "x", "content_type": "tëxt/plain"}), 400, ARGUMENT,
     ("messages[0].content_type: must be 1-256 printable ASCII",)),
    ("content-type-empty", _messages({"body": "x", "content_type": ""}), 400, ARGUMENT, ("messages[0].content_type",)),
    ("content-type-null", _messages({"body": "x", "content_type": None}), 400, ARGUMENT,
     ("messages[0].content_type",)),
    ("content-encoding-long", _messages({"body": "x", "content_encoding": "u" * 257}), 400, ARGUMENT,
     ("messages[0].content_encoding",)),
    ("correlation-id-newline", _messages({"body": "x", "correlation_id": "a\nb"}), 400, ARGUMENT,
     ("messages[0].correlation_id",)),
    ("creation-time", _messages(OK, {"body": "x", "creation_time": "today"}), 400, ARGUMENT,
     ("messages[1].creation_time: must be an RFC 3339 time",)),
    ("id-twice", _messages({"body": "1", "message_id": "m"}, OK, {"body": "2", "message_id": "m"}), 400, ARGUMENT,
     ("messages[2].message_id: 'm' is also the id of messages[0]",)),
    ("other-devices-id", _messages(OK, {"body": "x", "message_id": "theirs"}), 400, ARGUMENT,
     ("messages[1].message_id", "another device")),
]


@pytest.fixture
async def small(tmp_path: Path, start_sidecar: Any) -> AsyncIterator[Running]:
    """A sidecar with small limits (3 messages, 100-byte bodies, 4 kB batches) and a message of another
    device's, id ``theirs``, already stored."""
    run: Running = await start_sidecar(fake_config(tmp_path, api={"max_batch": 3, "max_body": 100,
                                                                  "max_batch_body": 4000, "rate_limit": 0}))
    resp = await run.client.post("/v1/devices/dev-http/messages", data=b"x", headers={"iothub-messageid": "theirs"})
    assert resp.status == 202
    yield run


@pytest.mark.parametrize(("body", "status", "code", "fragments"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
async def test_each_refusal_has_its_status_and_code_and_stores_nothing(small: Running, body: bytes, status: int,
                                                                       code: int, fragments: tuple[str, ...]):
    before = _stored(small)
    rejected = _counted(await (await small.client.get("/metrics")).text())
    await _refused(await small.client.post(BATCH, data=body, headers={"Content-Type": "application/json"}),
                   status, code, *fragments)
    assert _stored(small) == before
    assert small.sidecar.outbox.counts("dev-mqtt") == Outbox.empty_counts()
    # a refused batch counts once, whatever its size (the guard counts per request)
    assert _counted(await (await small.client.get("/metrics")).text()) == rejected + 1


async def test_limits_on_the_request_itself(small: Running):
    big = _messages({"body": "x" * 90}, {"body": "y" * 90}) + b" " * 4000
    await _refused(await small.client.post(BATCH, data=big), 413, TOO_LARGE, "4000")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused once 4000 bytes have arrived
        yield b'{"messages": [{"body": "'
        for _ in range(100):
            yield b"z" * 100
        yield b'"}]}'

    await _refused(await small.client.post(BATCH, data=chunks()), 413, TOO_LARGE, "limit of 4000")
    await _refused(await small.client.post(BATCH + "?ttl=-1", data=_messages(OK)), 400, ARGUMENT, "ttl")
    await _refused(await small.client.post(BATCH + "?ttl=nan", data=_messages(OK)), 400, ARGUMENT, "ttl")
    await _refused(await small.client.post("/v1/devices/nobody/messages/batch", data=_messages(OK)), 404, NO_DEVICE,
                   "'nobody'")
    small.sidecar.accepting = False
    try:
        resp = await small.client.post(BATCH, data=_messages(OK))
        await _refused(resp, 503, UNAVAILABLE, "shutting down")
        assert int(resp.headers["Retry-After"]) >= 1
    finally:
        small.sidecar.accepting = True
    assert small.sidecar.outbox.counts("dev-mqtt") == Outbox.empty_counts()
    resp = await small.client.post(BATCH + "?ttl=60", data=_messages(OK, OK, OK))  # exactly the limits: fine
    assert resp.status == 202
    answers = (await resp.json())["messages"]
    assert len({a["deadline"] for a in answers}) == 1 and answers[0]["deadline"] is not None


@pytest.mark.parametrize("body", [b'{"messages": [{"body": ' + b"[" * 100_000 + b"]}", b'{"messages": ' + b"[" * 50_000,
                                  b'{"messages": [{"body": ' + b"[" * 5_000 + b"]" * 5_000 + b"}]}"])
async def test_deeply_nested_json_is_400(tmp_path: Path, start_sidecar: Any, body: bytes):
    run = await start_sidecar(fake_config(tmp_path, api={"max_batch_body": 1_000_000}))
    resp = await run.client.post(BATCH, data=body)
    await _refused(resp, 400, ARGUMENT)
    assert _stored(run) == []


async def test_the_single_post_shares_the_field_rules(small: Running):
    """One validator per field: the single POST refuses what a batch refuses, naming its header."""
    single = "/v1/devices/dev-mqtt/messages"
    for headers, fragment in [({"iothub-app-$.ct": "x"}, "iothub-app-* headers: names must not start with '$'"),
                              ({"iothub-app-": "x"}, "iothub-app-* headers: names must not be empty"),
                              ({"iothub-messageid": "a b"}, "iothub-messageid: must be 1-128"),
                              ({"iothub-creation-time-utc": "today"}, "iothub-creation-time-utc: must be an RFC 3339"),
                              ({"Content-Type": "application/json"}, "the body: not valid JSON")]:
        await _refused(await small.client.post(single, data=b"x", headers=headers), 400, ARGUMENT, fragment)
    many = {f"iothub-app-p{i}": "v" for i in range(65)}
    await _refused(await small.client.post(single, data=b"x", headers=many), 400, ARGUMENT, "at most 64")
    assert small.sidecar.outbox.counts("dev-mqtt") == Outbox.empty_counts()


# -- duplicates, a full outbox, a storage failure ------------------------------------------------------------

async def test_ids_already_stored_for_the_device_are_answered_as_duplicates(tmp_path: Path, start_sidecar: Any):
    run = await start_sidecar(fake_config(tmp_path))
    first = await run.client.post("/v1/devices/dev-mqtt/messages", data=b"old", headers={"iothub-messageid": "m-1"})
    assert first.status == 202
    await run.wait_for(lambda: run.sidecar.outbox.get("m-1").status == "delivered")  # type: ignore[union-attr]
    accepted = run.sidecar.stats.totals[("accepted", None)]
    metered = _counted(await (await run.client.get("/metrics")).text(), "accepted")
    resp = await run.client.post(BATCH, json={"messages": [
        {"body": "new", "message_id": "m-1"}, {"body": "b", "message_id": "m-2"}, {"body": "c"}]})
    assert resp.status == 202, await resp.text()
    dup, second, third = (await resp.json())["messages"]
    assert dup == {"id": "m-1", "device_id": "dev-mqtt", "status": "delivered", "duplicate": True,
                   "deadline": dup["deadline"]}
    assert second["id"] == "m-2" and second["status"] == "pending" and second["duplicate"] is False
    assert third["duplicate"] is False and third["id"] not in ("m-1", "m-2")
    assert run.sidecar.stats.totals[("accepted", None)] == accepted + 2  # the duplicate is not counted again
    assert _counted(await (await run.client.get("/metrics")).text(), "accepted") == metered + 2
    await run.wait_for(lambda: {m.id for m in run.upstream.received} >= {"m-2", third["id"]})
    assert [m.body for m in run.upstream.received if m.id == "m-1"] == [b"old"]  # sent once, never replaced
    again = await run.client.post(BATCH, json={"messages": [{"body": "b", "message_id": "m-2"}]})
    assert (await again.json())["messages"][0]["duplicate"] is True


async def test_a_batch_that_does_not_fit_the_outbox_is_429_and_stores_nothing(tmp_path: Path, start_sidecar: Any):
    up = Upstream(block=asyncio.Event())  # nothing is acknowledged: the outbox fills
    run = await start_sidecar(fake_config(tmp_path, outbox={"max_messages": 3}), up)
    assert (await run.client.post(BATCH, json={"messages": [{"body": "1"}, {"body": "2"}]})).status == 202
    before = _stored(run)
    full = await run.client.post(BATCH, json={"messages": [{"body": "3"}, {"body": "4"}]})
    await _refused(full, 429, THROTTLED, "outbox is full")
    assert int(full.headers["Retry-After"]) >= 1
    assert _stored(run) == before and len(run.sidecar.outbox) == 2
    fits = await run.client.post(BATCH, json={"messages": [{"body": "3"}]})
    assert fits.status == 202 and len(run.sidecar.outbox) == 3
    # a batch larger than the whole outbox would never fit: malformed, not "retry later" forever
    never = await run.client.post(BATCH, json={"messages": [{"body": str(i)} for i in range(4)]})
    await _refused(never, 400, ARGUMENT, "at most 3 per batch")


async def test_a_storage_failure_is_503_and_stores_nothing(tmp_path: Path, start_sidecar: Any):
    cfg = fake_config(tmp_path)
    run = await start_sidecar(cfg)
    other = sqlite3.connect(cfg.outbox_path(), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another program holds the outbox's write lock: SQLite's own refusal
    try:
        resp = await run.client.post(BATCH, json={"messages": [{"body": "1"}, {"body": "2", "message_id": "s-2"}]})
        await _refused(resp, 503, UNAVAILABLE, "locked")
        assert int(resp.headers["Retry-After"]) >= 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert _stored(run) == []
    async with asyncio.timeout(15):  # it heals by itself; then the same batch goes in whole
        while (await run.client.get("/readyz")).status != 200:
            await asyncio.sleep(0.1)
    resp = await run.client.post(BATCH, json={"messages": [{"body": "1"}, {"body": "2", "message_id": "s-2"}]})
    assert resp.status == 202 and len(_stored(run)) == 2


# -- hostile input --------------------------------------------------------------------------------------------

_RUNNING: dict[int, Any] = {}


async def _shared(start_sidecar: Any, tmp_path_factory: Any) -> Running:
    key = id(start_sidecar)
    if key not in _RUNNING:
        _RUNNING.clear()
        _RUNNING[key] = await start_sidecar(fake_config(
            tmp_path_factory.mktemp("batch-fuzz"), api={"rate_limit": 0, "max_batch": 5, "max_body": 200}))
    return _RUNNING[key]  # type: ignore[no-any-return]


_ids = st.sampled_from(["a", "b", "c", "d"])  # few ids: duplicates, within a batch and against stored ones
_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                       | st.text(max_size=10), lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
_valid = st.fixed_dictionaries({"body": _values}, optional={
    "message_id": _ids, "properties": st.dictionaries(st.text("abcxyz-", min_size=1, max_size=5), st.text(max_size=5),
                                                      max_size=3),
    "content_encoding": st.just("utf-8"), "creation_time": st.just("2026-01-31T12:00:00Z")})
_hostile = st.fixed_dictionaries({}, optional={k: json_like for k in (
    "body", "body_base64", "properties", "message_id", "content_type", "content_encoding", "correlation_id",
    "creation_time", "extra")})
_batches = st.one_of(
    st.binary(max_size=300),
    json_like.map(lambda v: json.dumps(v).encode()),
    st.lists(_hostile | _valid, max_size=7).map(lambda m: json.dumps({"messages": m}).encode()),
    st.lists(_valid, min_size=1, max_size=5).map(lambda m: json.dumps({"messages": m}).encode()),
    st.lists(_valid, min_size=2, max_size=5, unique_by=lambda m: m.get("message_id", object())).map(
        lambda m: json.dumps({"messages": m}).encode()),
)


def _total(run: Running) -> int:
    """Messages ever stored: the outbox's counts (delivered is a running total), never a table scan."""
    c = run.sidecar.outbox.counts()
    return c["pending"] + c["inflight"] + c["delivered"] + c["dead"]


@API_FUZZ
@given(body=_batches, device=st.sampled_from(["dev-mqtt", "dev-http"]))
async def test_hostile_batches_never_answer_500_nor_store_part_of_a_batch(tmp_path_factory: Any,
                                                                         start_sidecar: Any, body: bytes,
                                                                         device: str) -> None:
    run = await _shared(start_sidecar, tmp_path_factory)
    before = _total(run)
    async with asyncio.timeout(30):
        resp = await run.client.post(f"/v1/devices/{device}/messages/batch", data=body)
        raw = await resp.read()
    assert resp.status != 500, raw[:300]
    assert_coded_answer(resp.status, resp.headers, raw)
    if resp.status == 202:
        answers = json.loads(raw)["messages"]
        assert len(answers) == len(json.loads(body)["messages"])
        assert _total(run) - before == sum(not a["duplicate"] for a in answers)  # each new one, once
        for answer in answers:
            item = run.sidecar.outbox.get(answer["id"])
            assert item is not None and item.device_id == device
    else:
        assert resp.status in (400, 413), raw[:300]
        assert _total(run) == before  # all or nothing
