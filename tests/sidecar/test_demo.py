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
