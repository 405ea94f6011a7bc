"""`iothub-gateway run` with a devices file: hundreds of devices from JSON Lines on the bundled emulator,
AMQP ones on one shared connection, no thread per device; a bad line is exit 2 naming the file and line."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import aiohttp

from tests.sidecar.test_process import ROOT, killed_at_end, start

AMQP, MQTT, HTTP = 240, 30, 30


def _write(tmp_path: Path) -> Path:
    lines = [json.dumps({"id": f"amqp-{i:03}"}) for i in range(AMQP)]  # protocol from [devices]
    lines += [json.dumps({"id": f"mqtt-{i:03}", "protocol": "mqtt"}) for i in range(MQTT)]
    lines += [json.dumps({"id": f"http-{i:03}", "protocol": "http"}) for i in range(HTTP)]
    (tmp_path / "devices.jsonl").write_text("# a fleet on the bundled emulator\n" + "\n".join(lines) + "\n")
    config = tmp_path / "gateway.toml"
    config.write_text('[api]\nport = 0\n\n[devices]\nfile = "devices.jsonl"\nprotocol = "amqp"\n\n'
                      '[outbox]\npath = "outbox.sqlite3"\n')
    return config


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


async def test_run_with_a_devices_file(tmp_path: Path) -> None:
    proc = await start(tmp_path, "--config", str(_write(tmp_path)))
    total = AMQP + MQTT + HTTP
    async with killed_at_end(proc), aiohttp.ClientSession() as http:
        async with asyncio.timeout(120):
            while True:
                async with http.get(f"{proc.url}/metrics") as resp:
                    text = await resp.text()
                if f'iothub_gateway_devices{{state="connected",transport="amqp"}} {AMQP}.0' in text:
                    break
                await asyncio.sleep(0.2)
        assert "iothub_gateway_amqp_connections{upstream=\"127.0.0.1:" in text
        conns = next(line for line in text.splitlines() if line.startswith("iothub_gateway_amqp_connections"))
        assert conns.endswith(" 1.0")  # 240 AMQP devices, one connection
        assert _threads(proc.proc.pid) < 60  # not one per device
        ids = []
        for device in ("amqp-000", "amqp-239", "mqtt-017", "http-029"):
            async with http.post(f"{proc.url}/v1/devices/{device}/messages", data=b"{}") as resp:
                assert resp.status == 202
                ids.append((await resp.json())["id"])
        async with asyncio.timeout(60):
            for mid in ids:
                while True:
                    async with http.get(f"{proc.url}/v1/messages/{mid}") as resp:
                        if (await resp.json())["status"] == "delivered":
                            break
                    await asyncio.sleep(0.1)
        async with http.get(f"{proc.url}/v1/devices?limit=5&after=amqp-237") as resp:
            page = await resp.json()
        assert page["total"] == total and page["next"] == "http-002"
        assert [d["id"] for d in page["devices"]] == ["amqp-238", "amqp-239", "http-000", "http-001", "http-002"]
        assert [d["multiplexed"] for d in page["devices"]] == [True, True, False, False, False]
        proc.proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
    assert "Traceback" not in proc.stderr.read_text()
    assert f"{total} device(s)" in proc.stderr.read_text()


async def test_a_bad_line_is_exit_2_naming_file_and_line(tmp_path: Path) -> None:
    config = _write(tmp_path)
    with (tmp_path / "devices.jsonl").open("a") as fh:
        fh.write('{"id": "amqp-000"}\n{"id": "x", "protocol": "mqtt", "multiplex": true}\n')
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", "run", "--config", str(config),
                                                cwd=ROOT, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    lines = err.decode().splitlines()
    first = AMQP + MQTT + HTTP + 2  # the comment line, then the devices
    assert proc.returncode == 2 and out == b""
    assert any(f"devices.jsonl:{first} (amqp-000) id: configured twice" in line for line in lines), lines
    assert any(f"devices.jsonl:{first + 1} (x) multiplex: only for protocol" in line for line in lines), lines
