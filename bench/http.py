"""Telemetry POSTs to the local emulator: a raw aiohttp loop against our HTTP adapter, same concurrency.

The emulator's HTTP front runs in a child process (so the two clients share no CPU with it), and both
clients run in this process, one after the other, in alternating rounds:

- raw: one ``aiohttp.ClientSession``, ``session.post`` with the SAS token, message id and properties
  as headers, ``await resp.read()``, a status check. The least any client can do.
- adapter: ``HttpTransport.send(Message)``: the same request, plus token caching, header checks, the
  capped body read, the translator on the answer and the timeout around the call.

Reported per client: requests per second (best round) and client CPU microseconds per request, and the
ratio adapter / raw (target: >= 0.9). Run: ``python bench/http.py [--requests N] [--concurrency C]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from statistics import median

# Run as a script, this file's directory comes first on sys.path and "bench/http.py" would shadow the
# standard library's ``http`` package that aiohttp imports: drop that entry, add the project root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import aiohttp
from yarl import URL

from adapters.http.transport import HttpTransport
from gateway.emulator import Hub
from gateway.sas import ConnectionString
from gateway.transport import Message

DEVICE = "bench-device"


async def serve() -> None:
    """Child process: run the emulator's HTTP front until stdin closes; print the port first."""
    from adapters.http.emulator import HttpFront

    hub = Hub()
    hub.add_device(DEVICE)
    hub.record = lambda received: None  # type: ignore[method-assign]  # keep memory flat over long runs
    front = HttpFront(hub)
    await front.start()
    print(front.port, hub.connection_string(DEVICE), sep="\n", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    await front.stop()


async def drive(n: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Run ``n`` calls of ``one`` with ``concurrency`` workers; the elapsed seconds."""
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


async def raw_round(url: str, conn: ConnectionString, n: int, concurrency: int) -> tuple[float, float]:
    token = conn.token(int(time.time()) + 3600)
    post_url = f"{url}/devices/{DEVICE}/messages/events"
    params = {"api-version": "2021-04-12"}
    body = b'{"temperature": 21.5}'
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> None:
            headers = {"Authorization": token, "iothub-messageid": f"m{i}", "Content-Type": "application/octet-stream",
                       "iothub-app-unit": "C"}
            async with session.post(post_url, params=params, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status >= 300:
                    raise RuntimeError(f"raw POST failed: {resp.status}")

        cpu = time.process_time()
        wall = await drive(n, concurrency, one)
        return wall, time.process_time() - cpu


async def adapter_round(url: str, conn: ConnectionString, n: int, concurrency: int) -> tuple[float, float]:
    parsed = URL(url)
    transport = HttpTransport(conn, host=parsed.host, port=parsed.port, ssl=None, connection_limit=concurrency)
    await transport.connect()
    body = b'{"temperature": 21.5}'
    props = {"unit": "C"}

    async def one(i: int) -> None:
        await transport.send(Message(f"m{i}", DEVICE, body, props))

    try:
        cpu = time.process_time()
        wall = await drive(n, concurrency, one)
        return wall, time.process_time() - cpu
    finally:
        await transport.close()


async def bench(url: str, conn: ConnectionString, n: int, concurrency: int, rounds: int) -> dict[str, list[tuple[float,
                                                                                                              float]]]:
    results: dict[str, list[tuple[float, float]]] = {"raw": [], "adapter": []}
    await raw_round(url, conn, min(n, 500), concurrency)  # warm up both paths and the server
    await adapter_round(url, conn, min(n, 500), concurrency)
    for r in range(rounds):
        order = [("raw", raw_round), ("adapter", adapter_round)]
        if r % 2:
            order.reverse()
        for name, fn in order:
            results[name].append(await fn(url, conn, n, concurrency))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="POSTs per round and client")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
        return 0

    child = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        conn = ConnectionString.parse(child.stdout.readline().strip())
        url = f"http://127.0.0.1:{port}"
        results = asyncio.run(bench(url, conn, args.requests, args.concurrency, args.rounds))
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()

    print(f"HTTP telemetry: {args.requests} POSTs x {args.rounds} rounds, concurrency {args.concurrency}, "
          f"emulator in a child process, aiohttp {aiohttp.__version__}")
    for name, rows in results.items():
        rates = sorted(args.requests / wall for wall, _ in rows)
        cpu = sorted(c / args.requests * 1e6 for _, c in rows)
        print(f"  {name:8s} median {median(rates):8.0f} req/s  best {rates[-1]:8.0f} req/s   "
              f"{median(cpu):6.1f} us client CPU/request (median)")
    # Each round runs both clients back to back, so a per-round ratio cancels load that drifts over the run.
    ratios = sorted(r[0] / a[0] for r, a in zip(results["raw"], results["adapter"], strict=True))
    cpu_ratios = sorted(r[1] / a[1] for r, a in zip(results["raw"], results["adapter"], strict=True))
    print(f"  ratio adapter/raw, req/s: median {median(ratios):.3f} (rounds {ratios[0]:.3f}-{ratios[-1]:.3f}); "
          f"target >= 0.9")
    print(f"  ratio raw/adapter, client CPU per request: median {median(cpu_ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
