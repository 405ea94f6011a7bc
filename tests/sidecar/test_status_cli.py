"""`iothub-gateway status` against a running sidecar (the in-memory upstream), token and failures included."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.codes import lookup
from gateway.errors import make_error
from tests.sidecar.fakes import Upstream, fake_config

TOKEN = "status-cli-token-0123456789"


async def _status(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, ["status", *argv])  # blocking urllib: off the sidecar's loop
    out, err = capsys.readouterr()
    return code, out, err


async def test_status_prints_each_device_with_its_latest_error(tmp_path: Path, start_sidecar: Any,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch):
    up = Upstream(send_script={"dev-http": [make_error(400004, transport="http")]})
    run = await start_sidecar(fake_config(tmp_path, api={"token": TOKEN}), up)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for device in ("dev-http", "dev-mqtt", "dev-mqtt"):
        assert (await run.client.post(f"/v1/devices/{device}/messages", data=b"x", headers=headers)).status == 202
    await run.wait_for(lambda: run.sidecar.outbox.counts()["pending"] + run.sidecar.outbox.counts()["inflight"] == 0)
    url = str(run.client.make_url("")).rstrip("/")

    code, out, err = await _status(capsys, "--url", url, "--token-env", "NO_SUCH_VARIABLE_FOR_THIS_TEST")
    assert code == 1 and out == "" and "401" in err and "--token-env" in err and err.count("\n") == 1

    monkeypatch.setenv("STATUS_CLI_TOKEN", TOKEN)
    code, out, err = await _status(capsys, "--url", url, "--token-env", "STATUS_CLI_TOKEN")
    assert code == 0 and err == "", err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["DEVICE", "PROTOCOL", "STATE"]
    by_device = {row.split()[0]: row for row in rows}
    assert set(by_device) == {"dev-mqtt", "dev-http"}
    assert by_device["dev-mqtt"].split()[1:3] == ["mqtt", "connected"] and by_device["dev-mqtt"].endswith(" -")
    assert f"400004 {lookup(400004).name} at " in by_device["dev-http"]
    cells = {d: row.split() for d, row in by_device.items()}
    assert cells["dev-mqtt"][4:7] == ["0", "2", "0"] and cells["dev-http"][4:7] == ["0", "0", "1"]  # queued/del/dead
    assert TOKEN not in out

    code, out, _ = await _status(capsys, "--url", url, "--token-env", "STATUS_CLI_TOKEN", "--json")
    assert code == 0 and {d["id"] for d in json.loads(out)} == {"dev-mqtt", "dev-http"}


async def test_status_without_a_sidecar_is_one_line(capsys: pytest.CaptureFixture[str]):
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    code, out, err = await _status(capsys, "--url", f"http://127.0.0.1:{port}")
    assert code == 1 and out == "" and err.count("\n") == 1 and f"127.0.0.1:{port}" in err
    assert (await _status(capsys, "--url", "localhost:8780"))[0] == 2


async def test_status_follows_the_pages_of_a_large_fleet(capsys: pytest.CaptureFixture[str]):
    """GET /v1/devices answers a page at a time (at most 1,000): status must list every device, not one page."""
    from aiohttp import web

    ids = [f"leaf-{i:02d}" for i in range(7)]
    asked: list[str | None] = []

    async def devices(request: web.Request) -> web.Response:
        after = request.query.get("after")
        asked.append(after)
        start = ids.index(after) + 1 if after else 0
        page = ids[start:start + 3]  # a server may page smaller than the limit asked
        nxt = page[-1] if start + 3 < len(ids) else None
        return web.json_response({"devices": [{"id": d, "protocol": "amqp", "state": "connected"} for d in page],
                                  "next": nxt, "total": len(ids)})

    app = web.Application()
    app.router.add_get("/v1/devices", devices)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        code, out, err = await _status(capsys, "--url", f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()
    assert code == 0 and err == "", err
    assert [row.split()[0] for row in out.splitlines()[1:]] == ids
    assert asked == [None, "leaf-02", "leaf-05"]
