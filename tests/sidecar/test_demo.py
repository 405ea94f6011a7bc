"""`iothub-gateway demo` as a user runs it: a real subprocess, its printed story and its summary."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: The code each story step must print (the normalized code that came back over the wire).
STEP_CODES = {
    1: 429001,  # throttling with Retry-After (HTTP)
    2: 503001,  # the outage: connects refused (MQTT, AMQP) and sends refused (HTTP)
    3: 409002,  # two clients on one identity: amqp:link:stolen
    4: 404103,  # the direct method for an offline device, held
    5: 403002,  # the daily quota
    6: 413001,  # a permanent refusal, dead-lettered
}


def test_demo_tells_the_whole_story_and_loses_nothing(tmp_path: Path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "demo"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=90, check=False)
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert "Demo policy" in out  # it says the curves are shortened

    steps = dict(re.findall(r"^  step (\d+) codes: (.*)$", out, re.M))
    assert sorted(int(n) for n in steps) == sorted(STEP_CODES), out
    for n, code in STEP_CODES.items():
        assert str(code) in steps[str(n)], f"step {n} did not print {code}: {steps[str(n)]!r}\n{out}"
        # ... as it happened, with the handler's action, not only in the step's tally
        assert re.search(rf"^  \[ *[\d.]+s\] .*{code} \w+( -> \w+)?", out, re.M), code

    assert re.search(r"-> throttle\b", out) and re.search(r"-> wait_for_device\b", out)
    assert re.search(r"-> wait_for_quota_reset\b", out) and re.search(r"-> stop_identity_conflict\b", out)
    assert "the intruder stopped" in out  # the identity fight was settled by the handler
    assert "released and delivered: status 200" in out  # the held method call went through
    assert re.search(r"parks demo-http until \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", out)  # the park-until time

    summary = out[out.index("== Summary"):]
    sent = int(re.search(r"sent \(202 Accepted\) = (\d+)", summary).group(1))  # type: ignore[union-attr]
    delivered = int(re.search(r"delivered = (\d+)", summary).group(1))  # type: ignore[union-attr]
    dead = int(re.search(r"dead-lettered = (\d+)", summary).group(1))  # type: ignore[union-attr]
    assert re.search(r"^  lost = 0$", summary, re.M), summary
    assert re.search(r"^  pending = 0$", summary, re.M), summary
    assert sent > 10 and dead == 1 and delivered + dead == sent, summary


async def test_demo_keep_running_leaves_the_page_up_until_ctrl_c(tmp_path: Path):
    """After the story the sidecar still answers (page, API, `iothub-gateway status`); SIGINT ends it, exit 0."""
    import asyncio
    import signal

    import aiohttp

    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", "demo", "--keep-running",
                                                cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(90):
            while not (seen and seen[-1].startswith("Still running")):
                line = (await proc.stdout.readline()).decode()
                assert line, f"the demo ended before it said it keeps running:\n{''.join(seen)[-4000:]}"
                seen.append(line)
        url = re.search(r"status page (http://127\.0\.0\.1:\d+)/", seen[-1]).group(1)  # type: ignore[union-attr]
        assert "lost = 0" in "".join(seen)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/") as resp:
                assert resp.status == 200 and "text/html" in resp.headers["Content-Type"]
            async with http.get(f"{url}/v1/devices") as resp:
                assert {d["id"] for d in (await resp.json())["devices"]} == {"demo-mqtt", "demo-amqp", "demo-http"}
        status = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway.cli", "status", "--url", url,
                                                      cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE)
        out, _ = await status.communicate()
        assert status.returncode == 0 and "demo-amqp" in out.decode()
        assert proc.returncode is None  # still up after all that
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            rest, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-3000:]
        assert "Stopping." in rest.decode() and "Traceback" not in err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
