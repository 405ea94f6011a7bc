"""Settled telemetry sends to the local emulator's AMQP front: raw proton vs our asyncio adapter.

Both clients send the same messages to the same front and count a message only once the front has
settled it (accepted). The front runs in a child process, so that its proton thread does not compete
for this process's GIL with the client being measured. "raw" is a plain proton
``MessagingHandler`` sender with nothing around it, in its own thread as an application would run it;
"adapter" is ``AmqpTransport.send`` awaited from asyncio, ``--concurrency`` sends in flight. The
ratio adapter/raw is what the thread bridge costs; the target is >= 0.8.

    python bench/amqp.py [--messages 20000] [--concurrency 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.amqp.emulator import AmqpFront
from adapters.amqp.transport import AmqpTransport
from gateway.emulator import Hub
from gateway.transport import Message


def raw_proton(port: int, token: str, audience: str, hub_host: str, device: str, count: int, window: int) -> float:
    """Messages per second for a plain proton sender (CBS put-token first, as IoT Hub requires)."""
    from proton import Message as PMessage
    from proton.handlers import MessagingHandler
    from proton.reactor import Container

    class Sender(MessagingHandler):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(auto_accept=False)
            self.sent = self.confirmed = 0
            self.started = 0.0
            self.elapsed = 0.0
            self.sender: Any = None

        def on_start(self, event: Any) -> None:
            self.conn = event.container.connect(f"amqp://127.0.0.1:{port}", reconnect=False,
                                                allowed_mechs="ANONYMOUS", virtual_host=hub_host)
            event.container.create_receiver(self.conn, "$cbs")
            cbs = event.container.create_sender(self.conn, "$cbs")
            put = PMessage(body=token, id="put-1", reply_to="cbs")
            put.properties = cast(Any, {"operation": "put-token", "type": "azure-devices.net:sastoken",
                                        "name": audience})
            cbs.send(put)

        def on_message(self, event: Any) -> None:  # the CBS answer: attach the telemetry link
            self.accept(event.delivery)
            address = f"amqps://{hub_host}/devices/{device}/messages/events"
            self.sender = event.container.create_sender(self.conn, address)

        def on_sendable(self, event: Any) -> None:
            if event.sender != self.sender:
                return
            if not self.started:
                self.started = time.perf_counter()
            while event.sender.credit and self.sent < count and self.sent - self.confirmed < window:
                event.sender.send(PMessage(id=f"raw-{self.sent}", body=b"x" * 64, inferred=True))
                self.sent += 1

        def on_accepted(self, event: Any) -> None:
            if event.sender != self.sender:
                return
            self.confirmed += 1
            if self.confirmed == count:
                self.elapsed = time.perf_counter() - self.started
                event.connection.close()
            elif self.sent < count:
                self.on_sendable(event)

    handler = Sender()
    done = threading.Event()

    def run() -> None:
        Container(handler).run()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    if not done.wait(120):
        raise RuntimeError("raw proton run did not finish")
    return count / handler.elapsed


async def adapter(port: int, connection_string: str, count: int, concurrency: int) -> float:
    t = AmqpTransport.from_connection_string(connection_string, host="127.0.0.1", port=port, ssl=None,
                                             receive_c2d=False)
    await t.connect()
    try:
        sem = asyncio.Semaphore(concurrency)
        run = uuid.uuid4().hex[:6]

        async def one(i: int) -> None:
            async with sem:
                await t.send(Message(f"a-{run}-{i}", t.device_id, b"x" * 64))

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        return count / (time.perf_counter() - started)
    finally:
        await t.close()


def serve_front(conn: Any) -> None:
    """Child process: one hub and its AMQP front, until the parent sends anything."""

    async def serve() -> None:
        hub = Hub()
        hub.add_device("bench")
        front = AmqpFront(hub)
        await front.start()
        conn.send((front.port, hub.host_name, hub.connection_string("bench"),
                   hub.token("bench", int(time.time()) + 3600)))
        await asyncio.to_thread(conn.recv)
        await front.stop()

    asyncio.run(serve())


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(target=serve_front, args=(child,), daemon=True)
    proc.start()
    try:
        port, hub_host, connection_string, token = await asyncio.to_thread(parent.recv)
        audience = f"{hub_host}/devices/bench"
        raws, ours = [], []
        for _ in range(args.rounds):  # interleaved, so drift hits both alike
            raws.append(await asyncio.to_thread(raw_proton, port, token, audience, hub_host, "bench",
                                                args.messages, args.concurrency))
            ours.append(await adapter(port, connection_string, args.messages, args.concurrency))
        raw, mine = statistics.median(raws), statistics.median(ours)
        print(f"settled sends to the local AMQP front (own process), {args.messages} x 64 B, "
              f"{args.concurrency} in flight, median of {args.rounds}")
        print(f"  raw proton MessagingHandler : {raw:9.0f} msg/s   {' '.join(f'{r:.0f}' for r in raws)}")
        print(f"  AmqpTransport (asyncio)     : {mine:9.0f} msg/s   {' '.join(f'{r:.0f}' for r in ours)}")
        print(f"  ratio adapter/raw           : {mine / raw:9.2f}  (target >= 0.80)")
    finally:
        parent.send("stop")
        proc.join(15)
        if proc.is_alive():
            proc.kill()


if __name__ == "__main__":
    asyncio.run(main())
