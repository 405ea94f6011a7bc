"""The sidecar's local API under load, in one run: classify, accept, deliver end to end, and memory.

Servers run as child processes, the load generator in this process (aiohttp, ``--concurrency``
requests in flight):

- the real sidecar, ``python -m gateway.cli run`` with a bench config: the bundled emulator as upstream
  (its three fronts in the sidecar's process), the durable outbox in a temporary directory,
  ``rate_limit = 0``;
- a bare aiohttp server with one ``POST /v1/classify`` handler that parses the JSON body and answers a
  small JSON object: the least an aiohttp API can do for the same request.

Measured:

1. ``POST /v1/classify`` requests per second, sidecar vs bare, in alternating rounds; the ratio is the
   median of the per-round ratios (target >= 0.7). The bodies cycle through the four shapes.
2. Accepted messages per second: ``POST /v1/devices/{id}/messages`` answered 202 (each committed to the
   SQLite outbox before the answer), across the three demo devices, while the sidecar also delivers.
3. End-to-end delivered messages per second: from the first POST until ``GET /v1/devices`` counts all of
   them delivered to the emulator (over MQTT, AMQP and HTTP).
4. The sidecar process's RSS (VmRSS) idle after start, and its peak while 2 and 3 run (target idle < 60 MB).

Ratios and figures are printed; nothing is asserted. Run: ``python bench/sidecar.py [--rounds N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from statistics import median
from typing import Any

# Run as a script, this file's directory comes first on sys.path (bench/http.py would shadow the
# standard library's ``http``): drop that entry and add the project root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import aiohttp

ROOT = _HERE.parent
URL_LINE = re.compile(r"http://127\.0\.0\.1:(\d+)")
DEVICES = ("demo-mqtt", "demo-amqp", "demo-http")
BODIES = [
    {"transport": "http", "status": 429, "headers": {"Retry-After": "7"},
     "body": '{"Message":"ErrorCode:ThrottlingException;Rate limit exceeded","ExceptionMessage":""}'},
    {"transport": "mqtt", "reason_code": 142, "protocol_version": 5, "packet": "disconnect"},
    {"transport": "mqtt", "topic": "$iothub/twin/res/429/?$rid=1"},
    {"transport": "amqp", "condition": "amqp:link:stolen", "description": "link stolen", "info": {}},
]
CONFIG = """
[api]
port = 0
rate_limit = 0
[outbox]
path = "{outbox}"
max_messages = 1000000
[logging]
level = "WARNING"
"""


def bare_server() -> None:
    """Child process: the bare aiohttp classify handler; prints its URL, serves until stdin closes."""
    from aiohttp import web

    async def classify(request: web.Request) -> web.Response:
        data = await request.json()
        return web.json_response({"error": None, "fields": len(data)})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/classify", classify)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(f"bare: http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await runner.cleanup()

    asyncio.run(main())


class Server:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (robust to other load on the machine)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return float("nan")
        match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
        return int(match.group(1)) / 1024 if match else float("nan")


@contextlib.contextmanager
def child(args: list[str], env: dict[str, str] | None = None, *, banner: str = "stdout") -> Any:
    """A child process and the URL from its start line: on stdout (the bare server) or stderr (the sidecar,
    whose stdout stays clean; its stderr goes to a file, so its logs never fill a pipe and stall it)."""
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=log if banner == "stderr" else subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})
    try:
        match = None
        if banner == "stdout":
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = URL_LINE.search(line)
        else:
            deadline = time.monotonic() + 60
            while match is None and time.monotonic() < deadline and proc.poll() is None:
                log.seek(0)
                match = URL_LINE.search(log.read())
                if match is None:
                    time.sleep(0.05)
            line = "(stderr)"
        if not match:
            raise RuntimeError(f"{args}: no URL in its start line: {line!r}")
        yield Server(proc, f"http://127.0.0.1:{match.group(1)}")
    finally:
        if proc.poll() is None:
            proc.terminate()  # the sidecar shuts down on SIGTERM; the bare server too
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


async def drive(n: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    """``n`` calls of ``one`` with ``concurrency`` workers; the elapsed seconds."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


@contextlib.asynccontextmanager
async def session(concurrency: int) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:
        yield s


async def classify_round(s: aiohttp.ClientSession, url: str, n: int, concurrency: int) -> float:
    bodies = [json.dumps(b).encode() for b in BODIES]
    headers = {"Content-Type": "application/json"}

    async def one(i: int) -> None:
        async with s.post(f"{url}/v1/classify", data=bodies[i % len(bodies)], headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"classify answered {resp.status}")

    return n / await drive(n, concurrency, one)


async def delivered(s: aiohttp.ClientSession, url: str) -> int:
    async with s.get(f"{url}/v1/devices") as resp:
        data = await resp.json()
    return sum(d["messages"].get("delivered", 0) for d in data["devices"])


async def wait_ready(s: aiohttp.ClientSession, url: str, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while True:
            async with s.get(f"{url}/v1/devices") as resp:
                data = await resp.json()
            if all(d["state"] == "connected" for d in data["devices"]):
                return
            await asyncio.sleep(0.1)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=9, help="alternating classify rounds (default 9)")
    parser.add_argument("--requests", type=int, default=2000, help="classify requests per round and server")
    parser.add_argument("--messages", type=int, default=6000, help="messages for the accept/deliver run")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-sidecar-"))
    config = tmp / "gateway.toml"
    config.write_text(CONFIG.format(outbox=tmp / "outbox.sqlite3"))
    env = {"XDG_STATE_HOME": str(tmp / "state")}
    print(f"bench/sidecar.py: {os.cpu_count()} CPU(s), concurrency {args.concurrency}, Python "
          f"{sys.version.split()[0]}, aiohttp {aiohttp.__version__}")
    with child(["-m", "gateway.cli", "run", "--config", str(config)], env, banner="stderr") as sidecar, \
            child([str(Path(__file__).resolve()), "--bare-server"]) as bare:
        async with session(args.concurrency) as s:
            await wait_ready(s, sidecar.url)
            await asyncio.sleep(1.0)
            idle = sidecar.rss_mb()

            # 1. classify vs bare
            await classify_round(s, sidecar.url, 500, args.concurrency)  # warm-up (imports, caches)
            await classify_round(s, bare.url, 500, args.concurrency)
            ours: list[float] = []
            theirs: list[float] = []
            cpu: dict[str, list[float]] = {"sidecar": [], "bare": []}
            for r in range(args.rounds):
                order = [(sidecar, ours, "sidecar"), (bare, theirs, "bare")]
                for server, into, name in order if r % 2 == 0 else order[::-1]:
                    used = server.cpu_seconds()
                    into.append(await classify_round(s, server.url, args.requests, args.concurrency))
                    cpu[name].append((server.cpu_seconds() - used) / args.requests * 1e6)
            ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
            cpu_ratio = median(cpu["bare"]) / median(cpu["sidecar"])

            # 2 + 3. accept into the outbox, deliver end to end; sample RSS meanwhile
            peak = idle
            sampling = True

            async def sample() -> None:
                nonlocal peak
                while sampling:
                    peak = max(peak, sidecar.rss_mb())
                    await asyncio.sleep(0.05)

            sampler = asyncio.ensure_future(sample())
            before = await delivered(s, sidecar.url)
            payload = json.dumps({"temperature": 21.5, "humidity": 40, "pad": "x" * 150}).encode()

            async def post(i: int) -> None:
                device = DEVICES[i % len(DEVICES)]
                async with s.post(f"{sidecar.url}/v1/devices/{device}/messages", data=payload,
                                  headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if resp.status != 202:
                        raise RuntimeError(f"POST answered {resp.status}")

            start = time.perf_counter()
            accept_s = await drive(args.messages, args.concurrency, post)
            async with asyncio.timeout(300):
                while await delivered(s, sidecar.url) - before < args.messages:
                    await asyncio.sleep(0.05)
            e2e_s = time.perf_counter() - start
            sampling = False
            await sampler
            after = sidecar.rss_mb()

    print()
    print("1. POST /v1/classify, requests per second (median of rounds):")
    print(f"   bare aiohttp handler  {median(theirs):8.0f}")
    print(f"   sidecar               {median(ours):8.0f}")
    print(f"   ratio sidecar / bare  {median(ratios):8.2f}   (per round: {', '.join(f'{x:.2f}' for x in ratios)};"
          f" target >= 0.7)")
    print(f"   server CPU per request: bare {median(cpu['bare']):.0f} µs, sidecar {median(cpu['sidecar']):.0f} µs;"
          f" ratio bare / sidecar {cpu_ratio:.2f} (steadier than req/s when other jobs share the CPUs)")
    print(f"2. accepted messages per second (202, committed to the outbox): {args.messages / accept_s:8.0f}"
          f"   ({args.messages} messages over 3 devices, delivery running meanwhile)")
    print(f"3. delivered end to end per second (POST -> hub ack):          {args.messages / e2e_s:8.0f}"
          f"   ({e2e_s:.1f} s for all {args.messages})")
    print(f"4. sidecar RSS: idle {idle:.1f} MB (target < 60 MB), peak under load {peak:.1f} MB, after {after:.1f} MB"
          f"   (the emulator's three fronts run in the same process)")


if __name__ == "__main__":
    if "--bare-server" in sys.argv:
        bare_server()
    else:
        asyncio.run(main())
