"""Runtime control: the admin API in-process, and the standalone emulator driven from outside by the
CLI (fault add/list/clear, messages, c2d send), printing the connection strings it serves, keeping
its registry across a restart."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from adapters.http.emulator import HttpFront
from gateway.emulator import Hub
from gateway.emulator.admin import AdminServer
from gateway.sas import ConnectionString

ROOT = pathlib.Path(__file__).resolve().parents[2]
FOREVER = 4_000_000_000


@pytest.fixture
async def admin(hub: Hub) -> AsyncIterator[AdminServer]:
    server = AdminServer(hub)
    await asyncio.wait_for(server.start(), 5)
    yield server
    await asyncio.wait_for(server.stop(), 5)


async def call(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with asyncio.timeout(10), aiohttp.ClientSession() as s, s.request(method, url, **kwargs) as r:
        raw = await r.read()
        return r.status, json.loads(raw) if raw else None


async def test_admin_api_faults_messages_c2d(hub: Hub, admin: AdminServer) -> None:
    status, fault = await call("POST", f"{admin.url}/faults", json={"operation": "telemetry", "code": 429001,
                                                                    "for_seconds": 120, "transport": "http"})
    assert status == 201 and fault["times"] is None and fault["id"]
    assert [f.code for f in hub.plan.pending()] == [429001]
    status, listed = await call("GET", f"{admin.url}/faults")
    assert status == 200 and [f["id"] for f in listed] == [fault["id"]]
    status, body = await call("POST", f"{admin.url}/faults", json={"operation": "telemetry", "code": 12})
    assert status == 400 and "error" in body
    status, body = await call("POST", f"{admin.url}/faults", json={"operation": "telemetry", "code": 429001,
                                                                  "transport": "mqtt", "retry_after": 1})
    assert status == 400 and "MQTT" in body["error"]
    assert (await call("DELETE", f"{admin.url}/faults/{fault['id']}"))[0] == 204
    assert (await call("DELETE", f"{admin.url}/faults/{fault['id']}"))[0] == 404
    assert hub.plan.pending() == []

    from gateway.emulator.hub import Received

    hub.record(Received("d1", "m1", b"\xff\x00", "mqtt", {"k": "v"}))
    hub.record(Received("d2", "m2", b"text", "amqp", {}))
    status, page = await call("GET", f"{admin.url}/messages?device=d2")
    assert status == 200 and page["next"] == 2
    assert [(m["message_id"], m["body"]) for m in page["messages"]] == [("m2", "text")]
    status, page = await call("GET", f"{admin.url}/messages")
    assert page["messages"][0]["body"] is None and page["messages"][0]["body_base64"] == "/wA="
    status, page = await call("GET", f"{admin.url}/messages?since=2")
    assert page == {"messages": [], "next": 2}

    status, sent = await call("POST", f"{admin.url}/devices/d1/c2d", json={"body": "hi", "properties": {"a": 1},
                                                                          "ack": "full"})
    assert status == 201
    entry = hub.lock_c2d("d1", 60, now=0)
    assert entry is not None and (entry.message_id, entry.body, entry.properties) == (sent["message_id"], b"hi",
                                                                                       {"a": "1"})
    assert (await call("POST", f"{admin.url}/devices/nobody/c2d", json={"body": "x"}))[0] == 404
    assert (await call("POST", f"{admin.url}/devices/d1/c2d", json={"body_base64": "!!"}))[0] == 400
    status, devices = await call("GET", f"{admin.url}/devices")
    assert {d["device_id"] for d in devices} == {"d1", "d2"} and "SharedAccessKey=" in devices[0]["connection_string"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", "emulator", *args], check=False, capture_output=True,
                          text=True, cwd=ROOT, timeout=30, env={**os.environ, **(env or {})})


def _start(*extra: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "emulator", "--device", "d1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    lines: dict[str, str] = {}
    for line in proc.stdout:
        key, _, value = line.strip().partition(": ")
        lines[key] = value
        if key == "faults":
            break
    return proc, lines


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


async def test_the_cli_drives_a_running_emulator(tmp_path: pathlib.Path) -> None:
    proc, lines = _start()
    try:
        assert lines["service"].startswith("HostName=") and "SharedAccessKeyName=iothubowner" in lines["service"]
        device = ConnectionString.parse(lines["device d1"])
        url, admin_url = lines["http"], lines["admin"]
        added = await asyncio.to_thread(_cli, "fault", "add", "telemetry", "--code", "ThrottlingException",
                                        "--transport", "http", "--times", "1", "--admin", admin_url)
        assert added.returncode == 0, added.stderr
        fault_id = json.loads(added.stdout)["id"]
        listed = await asyncio.to_thread(_cli, "fault", "list", env={"IOTHUB_EMULATOR_ADMIN": admin_url})
        assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [fault_id]

        headers = {"Authorization": device.token(FOREVER), "iothub-messageid": "m1", "iothub-app-k": "v"}
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/devices/d1/messages/events", data=b"{}", headers=headers) as r:
                assert r.status == 429  # the fault the CLI added, answered once
            async with s.post(f"{url}/devices/d1/messages/events", data=b"{}", headers=headers) as r:
                assert r.status == 204
        shown = await asyncio.to_thread(_cli, "messages", "--admin", admin_url)
        assert [(m["message_id"], m["properties"]) for m in map(json.loads, shown.stdout.splitlines())] == \
            [("m1", {"k": "v"})]

        sent = await asyncio.to_thread(_cli, "c2d", "send", "d1", "hello", "--property", "a=1", "--admin", admin_url)
        assert sent.returncode == 0, sent.stderr
        async with aiohttp.ClientSession() as s, s.get(f"{url}/devices/d1/messages/deviceBound", headers=headers) as r:
            assert r.status == 200 and await r.read() == b"hello"
            assert r.headers["iothub-messageid"] == sent.stdout.strip() and r.headers["iothub-app-a"] == "1"

        bad = await asyncio.to_thread(_cli, "fault", "add", "telemetry", "--code", "12", "--admin", admin_url)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1
        cleared = await asyncio.to_thread(_cli, "fault", "clear", "--admin", admin_url)
        assert cleared.returncode == 0
    finally:
        _stop(proc)
    gone = await asyncio.to_thread(_cli, "fault", "list", "--admin", admin_url)
    assert gone.returncode == 1 and "cannot reach" in gone.stderr
    nowhere = await asyncio.to_thread(_cli, "fault", "list", env={"IOTHUB_EMULATOR_ADMIN": ""})
    assert nowhere.returncode == 2 and "--admin" in nowhere.stderr


def test_keys_are_random_per_run_unless_a_registry_keeps_them(tmp_path: pathlib.Path) -> None:
    registry = tmp_path / "registry.json"
    first_proc, first = _start("--registry", str(registry))
    _stop(first_proc)
    second_proc, second = _start("--registry", str(registry))
    _stop(second_proc)
    third_proc, third = _start()
    _stop(third_proc)
    assert first["device d1"] == second["device d1"] and first["service"] == second["service"]
    assert third["device d1"] != first["device d1"] and third["service"] != first["service"]
    assert json.loads(registry.read_text())["devices"]["d1"]["primaryKey"] in first["device d1"]


async def test_http_front_uses_the_hubs_service_key(hub: Hub) -> None:
    front = HttpFront(hub)
    assert hub.service_key in front.service_connection_string
    assert HttpFront(hub, service_key="b3RoZXI=").service_connection_string.endswith("SharedAccessKey=b3RoZXI=")
