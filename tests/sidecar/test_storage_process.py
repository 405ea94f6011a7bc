"""The real `iothub-gateway run` process and its outbox file: a disk that fills for real (RLIMIT_FSIZE),
and two sidecars on one machine."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import aiohttp

from gateway.codes import code_of
from tests.sidecar.test_process import ROOT, Proc, killed_at_end, start, start_line

#: ``gateway.cli run`` in a process whose files may not grow past argv[1] bytes until it gets SIGUSR1:
#: the kernel refuses the writes (EFBIG) exactly as a full disk refuses them (ENOSPC).
_LIMITED = textwrap.dedent("""
    import resource, runpy, signal, sys
    limit = int(sys.argv.pop(1))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, lambda *_: resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard)))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    sys.argv[0] = "iothub-gateway"
    runpy.run_module("gateway.cli", run_name="__main__")
""")


async def _start_limited(tmp_path: Path, limit: int) -> Proc:
    stderr = tmp_path / "run.stderr"
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "PYTHONPATH": str(ROOT)}
    with stderr.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _LIMITED, str(limit), "run", "--port", "0", cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=err)
    return Proc(proc, await start_line(proc, stderr), stderr)


async def test_disk_full_for_real_answers_503_and_heals_by_itself(tmp_path: Path):
    proc = await _start_limited(tmp_path, 1 << 20)  # the outbox may not pass 1 MiB
    accepted: list[str] = []
    async with killed_at_end(proc), aiohttp.ClientSession() as http:
        body = os.urandom(6000).hex().encode()  # 12 kB that do not compress
        full = None
        for _ in range(300):
            async with http.post(f"{proc.url}/v1/devices/demo-mqtt/messages", data=body) as resp:
                if resp.status == 503:
                    full = await resp.json()
                    assert resp.headers.get("Retry-After")
                    break
                assert resp.status == 202, await resp.text()
                accepted.append((await resp.json())["id"])
        assert full is not None and full["errorCode"] == code_of("ServiceUnavailable"), "the limit never bit"
        assert len(accepted) > 5
        async with http.get(f"{proc.url}/readyz") as resp:
            ready, body = resp.status, await resp.json()
        async with http.get(f"{proc.url}/v1/devices/demo-mqtt") as resp:
            device = await resp.json()
        if ready == 503:  # still full: visible on readiness and on the device
            assert body["storage"]["kind"] in {"full", "io"}
            assert device["storage"]["code"] == code_of("ServiceUnavailable")
        else:  # a loaded machine: the once-a-second probe's small write already fit (freed pages), so it healed;
            # while the disk stays full the next bigger write can fail again between the two reads: then it says so
            assert ready == 200
            assert device["storage"] is None or device["storage"]["code"] == code_of("ServiceUnavailable")

        proc.proc.send_signal(signal.SIGUSR1)  # room again
        async with asyncio.timeout(20):
            while True:
                async with http.get(f"{proc.url}/readyz") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.1)
        async with http.post(f"{proc.url}/v1/devices/demo-mqtt/messages", data=b"after") as resp:
            assert resp.status == 202
            accepted.append((await resp.json())["id"])
        async with asyncio.timeout(30):  # everything that got a 202 reaches the hub
            for mid in accepted:
                while True:
                    async with http.get(f"{proc.url}/v1/messages/{mid}") as resp:
                        if (await resp.json())["status"] == "delivered":
                            break
                    await asyncio.sleep(0.05)
        proc.proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
    text = proc.stderr.read_text()
    assert "Traceback" not in text and "outbox storage failed" in text and "works again" in text


async def test_two_sidecars_get_their_own_outbox_or_a_clear_refusal(tmp_path: Path):
    """Different configs: a default outbox each. The same config twice: the second names the holder."""
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("")
    b.write_text("")
    first = await start(tmp_path, "--config", str(a), "--port", "0", name="a")
    async with killed_at_end(first):
        second = await start(tmp_path, "--config", str(b), "--port", "0", name="b")
        async with killed_at_end(second):
            async with aiohttp.ClientSession() as http:
                for proc in (first, second):
                    async with http.get(f"{proc.url}/readyz") as resp:
                        assert resp.status == 200
            second.proc.send_signal(signal.SIGTERM)
            assert await second.wait() == 0
        third = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "run", "--config", str(a), "--port", "0", cwd=ROOT,
            env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(30):
            out, err = await third.communicate()
        assert third.returncode == 1 and out == b""
        lines = err.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert f"pid {first.proc.pid}" in lines[0] and "[outbox] path" in lines[0] and str(a) in lines[0]
        first.proc.send_signal(signal.SIGTERM)
        assert await first.wait() == 0
    outboxes = sorted(p.name for p in (tmp_path / "state" / "iothub-gateway").glob("outbox-*.sqlite3"))
    assert len(outboxes) == 2
