"""``iothub-gateway demo``: the sidecar on the bundled emulator, through a scripted story of IoT Hub failures.

Everything runs in this process on loopback: the emulated hub with its HTTP, MQTT and AMQP fronts, the
sidecar's API on a free port (its status page too) and a few extra clients. Faults come from the
emulator's fault plan, so every code printed came back over a real wire and through the translators.
The handlers use a demo policy with short curves, so the story takes seconds instead of hours; the
output says so, and shows what the shipped policy would have decided where the difference matters
(the daily quota parks until midnight UTC).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from gateway.aio import cancel_and_wait
from gateway.codes import code_of, lookup
from gateway.emulator import Operation
from gateway.errors import IoTHubError, make_error
from gateway.handler import Handler, State, StateChange
from gateway.policy import History, ParkUntil, Policy, PolicyConfig, next_utc_midnight
from gateway.policy import Operation as PolicyOperation
from gateway.sidecar.config import SidecarConfig, parse_config
from gateway.sidecar.service import Sidecar
from gateway.transport import (
    Inbound,
    InvokeMethod,
    Message,
    MethodCall,
    Request,
    RespondMethod,
    Transport,
    TransportEvent,
)

__all__ = ["DEMO_POLICY", "main", "run_demo"]

_THROTTLED = code_of("ThrottlingException")
_UNAVAILABLE = code_of("ServiceUnavailable")
_QUOTA = code_of("IotHubQuotaExceeded")
_TOO_LARGE = code_of("MessageTooLarge")

#: Short curves so that every wait in the story is a second or two (the shipped ones are minutes).
DEMO_POLICY: dict[str, dict[str, Any]] = {
    "retry": {"initial": 0.1, "cap": 0.5, "max_attempts": 6, "max_elapsed": 10.0},
    "reconnect": {"initial": 0.2, "cap": 1.0},
    "throttle": {"initial": 0.5, "cap": 2.0, "max_retry_after": 5.0},
    "identity": {"initial": 0.3, "cap": 0.6, "window": 60.0, "max_takeovers": 3},
    "quota": {"probe_interval": 1.5},
    "device": {"hold_timeout": 20.0},
    "operation": {"timeout": 20.0, "connect_timeout": 5.0},
}
DEVICES = {"mqtt": "demo-mqtt", "amqp": "demo-amqp", "http": "demo-http"}
PUMP = "demo-pump"  #: the device that goes offline (not one of the sidecar's; it serves direct methods)
STEP_TIMEOUT = 25.0


def _demo_config(outbox: Path) -> SidecarConfig:
    return parse_config({
        "api": {"port": 0, "rate_limit": 0},
        "outbox": {"path": str(outbox)},
        "delivery": {"shutdown_deadline": 2.0},
        "policy": DEMO_POLICY,
    }, source="<demo>", env={})


def _epoch(value: Any) -> float | None:
    """An event's RFC 3339 time (or epoch seconds) as epoch seconds; None if it is neither."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def _utc(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


class Story:
    """Prints the story as it happens and collects the codes each step saw."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.codes: dict[int, str] = {}
        self.step_no = 0
        self.quiet = True

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def line(self, who: str, text: str) -> None:
        self.say(f"  [{time.monotonic() - self.t0:5.1f}s] {who:<10} {text}")

    def code(self, who: str, code: int | None, what: str, action: str | None, extra: str = "") -> None:
        if code is None:
            self.line(who, what + (f" ({extra})" if extra else ""))
            return
        name = lookup(code).name
        self.codes[code] = name
        arrow = f" -> {action}" if action else ""
        self.line(who, f"{what:<22} {code} {name}{arrow}" + (f"  ({extra})" if extra else ""))

    def step(self, title: str) -> None:
        self.step_no += 1
        self.codes = {}
        self.say()
        self.say(f"== {self.step_no}. {title}")

    def end_step(self) -> None:
        seen = ", ".join(f"{code} {name}" for code, name in sorted(self.codes.items())) or "none"
        self.say(f"  step {self.step_no} codes: {seen}")

    def state_event(self, data: dict[str, Any]) -> None:
        if self.quiet:
            return
        extra = ""
        until = _epoch(data.get("until"))  # events carry RFC 3339 times
        if until is not None and data.get("state") in ("throttled", "parked", "disconnected-retrying"):
            extra = f"until {_utc(until)}" if until - time.time() > 60 else f"next try in {until - time.time():.1f}s"
        if data.get("code") is None:
            reason = data.get("reason") or ""
            self.line(str(data.get("device")), f"{data.get('state')}" + (f" ({reason})" if reason and
                                                                         reason != data.get("state") else ""))
            return
        if data.get("state") == "connected":  # the code is what it recovered from
            self.line(str(data.get("device")), f"connected (recovered from {data['code']} {data.get('name')})")
            return
        self.code(str(data.get("device")), data["code"], str(data.get("state")), data.get("action"), extra)


class Watched:
    """A transport wrapper that reports each failure as it happens, with the action the policy takes."""

    def __init__(self, inner: Transport, who: str, story: Story, policy: Policy) -> None:
        self.inner = inner
        self.name = inner.name
        self.who = who
        self.story = story
        self.policy = policy

    def _report(self, what: str, err: IoTHubError) -> None:
        self.story.code(self.who, err.code, what, self.policy.action_for(err).value)

    async def connect(self) -> None:
        try:
            await self.inner.connect()
        except IoTHubError as err:
            self._report("connect", err)
            raise

    async def close(self) -> None:
        await self.inner.close()

    async def send(self, message: Message) -> None:
        try:
            await self.inner.send(message)
        except IoTHubError as err:
            self._report("send", err)
            raise

    @property
    def credential_expiry(self) -> float | None:
        return getattr(self.inner, "credential_expiry", None)

    @property
    def ambiguous_drops(self) -> bool:
        return bool(getattr(self.inner, "ambiguous_drops", False))

    async def request(self, request: Request, *, timeout: float) -> Any:
        try:
            return await self.inner.request(request, timeout=timeout)
        except IoTHubError as err:
            self._report(type(request).__name__, err)
            raise

    def events(self) -> AsyncIterator[TransportEvent]:
        return self.inner.events()


class Demo:
    def __init__(self, out: TextIO, workdir: Path, *, keep_running: bool = False) -> None:
        self.keep_running = keep_running
        self.story = Story(out)
        self.workdir = workdir
        self.config = _demo_config(workdir / "outbox.sqlite3")
        self.policy = self.config.policy
        self.sidecar = Sidecar(self.config)
        self.accepted: list[str] = []
        self.url = ""
        self.session: Any = None

    # -- plumbing -------------------------------------------------------------------------------------

    @property
    def hub(self) -> Any:
        assert self.sidecar.emulator is not None
        return self.sidecar.emulator.hub

    def front(self, protocol: str) -> Any:
        assert self.sidecar.emulator is not None
        return self.sidecar.emulator.fronts[protocol]

    async def post(self, device: str, n: int = 1) -> list[str]:
        ids = []
        for i in range(n):
            async with self.session.post(f"{self.url}/v1/devices/{device}/messages",
                                         json={"seq": len(self.accepted) + i, "device": device}) as resp:
                body = await resp.json()
                if resp.status != 202:
                    raise RuntimeError(f"POST for {device} answered {resp.status}: {body}")
                ids.append(body["id"])
        self.accepted.extend(ids)
        return ids

    async def settled(self, ids: Iterable[str], timeout: float = STEP_TIMEOUT) -> bool:
        """Wait until each message is delivered or dead-lettered; False if that takes too long."""
        wanted = list(ids)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    items = [self.sidecar.outbox.get(mid) for mid in wanted]
                    if all(item is not None and item.status in ("delivered", "dead") for item in items):
                        return True
                    await asyncio.sleep(0.05)
        except TimeoutError:
            self.story.line("demo", f"!! not settled after {timeout:.0f}s; the summary will show it")
            return False

    def report(self, ids: list[str]) -> None:
        statuses: dict[str, int] = {}
        for mid in ids:
            item = self.sidecar.outbox.get(mid)
            status = item.status if item is not None else "missing"
            statuses[status] = statuses.get(status, 0) + 1
        text = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
        self.story.line("sidecar", f"{len(ids)} message(s) posted in this step: {text}")

    async def until(self, check: Callable[[], bool], timeout: float = STEP_TIMEOUT) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while not check():
                    await asyncio.sleep(0.05)
            return True
        except TimeoutError:
            return False

    def state(self, device: str) -> State:
        return self.sidecar.pipelines[device].handler.state

    async def printer(self) -> None:
        async for _id, kind, data in self.sidecar.events.subscribe():
            if kind == "state":
                self.story.state_event(data)
            elif kind == "dead_letter" and not self.story.quiet:
                self.story.code(str(data.get("device")), data.get("code"), "dead-lettered", "fail",
                                f"message {str(data.get('id'))[:8]}…")

    def on_state(self, who: str) -> Callable[[StateChange], None]:
        def hook(change: StateChange) -> None:
            action = self.policy.action_for(change.cause).value if change.cause is not None else None
            if change.code is None:
                self.story.line(who, change.state.value)
            elif change.state is State.CONNECTED:
                self.story.line(who, f"connected (recovered from {change.code} {lookup(change.code).name})")
            else:
                self.story.code(who, change.code, change.state.value, action, change.reason)
        return hook

    # -- the story ------------------------------------------------------------------------------------

    async def run(self) -> int:
        from aiohttp import ClientSession, ClientTimeout, web

        from gateway.sidecar.app import make_app

        s = self.story
        s.say("iothub-gateway demo: the sidecar on the bundled emulator (HTTP, MQTT and AMQP fronts on loopback)")
        s.say("Demo policy: short curves so the story takes seconds, not hours (the shipped defaults are in "
              "configs/policy.toml):")
        for section, values in DEMO_POLICY.items():
            s.say(f"  [{section}] " + ", ".join(f"{k} = {v}" for k, v in values.items()))
        runner = web.AppRunner(make_app(self.sidecar), handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        printer: asyncio.Task[None] | None = None
        try:
            await self.sidecar.start()
            printer = asyncio.get_running_loop().create_task(self.printer())
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            s.say(f"Sidecar API on {self.url} (status page: {self.url}/), devices: "
                  + ", ".join(f"{d} ({p})" for p, d in DEVICES.items()))
            async with ClientSession(timeout=ClientTimeout(total=10)) as self.session:
                if not await self.until(lambda: all(self.state(d) is State.CONNECTED for d in DEVICES.values())):
                    s.say("!! the sidecar's devices did not connect to the emulator")
                    return 1
                ids = await self.post(DEVICES["mqtt"]) + await self.post(DEVICES["amqp"]) + \
                    await self.post(DEVICES["http"])
                await self.settled(ids)
                s.say("All three devices connected; one message each delivered.")
                s.quiet = False
                for step in (self.throttling, self.outage, self.identity, self.offline_method, self.quota,
                             self.refusal):
                    try:
                        async with asyncio.timeout(STEP_TIMEOUT + 10):
                            await step()
                    except TimeoutError:
                        s.line("demo", "!! step timed out; going on")
                    s.end_step()
                s.quiet = True
                code = self.summary(await self.drain())
                if self.keep_running:
                    await self.hold(code)
                return code
        finally:
            await cancel_and_wait(printer)
            await site.stop()
            await self.sidecar.stop()
            await runner.cleanup()

    async def throttling(self) -> None:
        device = DEVICES["http"]
        self.story.step(f"Throttling: the hub answers 429 with Retry-After: 1 ({device}, HTTP)")
        self.hub.plan.add(Operation.TELEMETRY, _THROTTLED, device=device, transport="http", retry_after=1, times=2)
        ids = await self.post(device, 3)
        await self.settled(ids)
        self.report(ids)

    async def outage(self) -> None:
        self.story.step("Hub outage and recovery: every connection dropped, connects refused for 2.5 s")
        plan = self.hub.plan
        plan.add(Operation.CONNECT, _UNAVAILABLE, times=None)
        plan.add(Operation.TELEMETRY, _UNAVAILABLE, transport="http", times=None)
        for protocol in ("mqtt", "amqp", "http"):
            await self.front(protocol).drop_all()
        self.story.line("emulator", "dropped every connection; refusing connects with 503001 ServiceUnavailable")
        ids: list[str] = []
        for device in DEVICES.values():
            ids += await self.post(device, 2)
        self.story.line("sidecar", f"accepted {len(ids)} message(s) during the outage (202, in the outbox)")
        await asyncio.sleep(2.5)
        plan.clear()
        self.story.line("emulator", "hub is back")
        await self.settled(ids)
        await self.until(lambda: all(self.state(d) is State.CONNECTED for d in DEVICES.values()), 10)
        self.report(ids)

    async def identity(self) -> None:
        from adapters.amqp.transport import AmqpTransport

        device = DEVICES["amqp"]
        intruder_policy = Policy(dataclasses.replace(
            self.policy.config, identity=dataclasses.replace(self.policy.config.identity, max_takeovers=2)))
        self.story.step(f"Two clients fight over one identity: a second AMQP client connects as {device}")
        self.story.line("demo", "the intruder runs the same handler (identity max_takeovers = 2; the sidecar's "
                                "is 3)")
        assert self.sidecar.emulator is not None
        cs = self.sidecar.emulator.register(device)
        transport = AmqpTransport.from_connection_string(cs, host="127.0.0.1", port=self.front("amqp").port,
                                                         ssl=None, receive_c2d=False)
        intruder = Handler(Watched(transport, "intruder", self.story, intruder_policy), policy=intruder_policy,
                           identity=device, refresh_credentials=_no_refresh, on_state_change=self.on_state("intruder"))
        ids = await self.post(device, 3)
        await intruder.start()
        try:
            settled = await self.until(lambda: intruder.state is State.STOPPED)
            if settled:
                self.story.line("demo", f"settled: the intruder stopped ({intruder.last_change.reason}); "
                                        f"the sidecar keeps {device}")
            else:
                self.story.line("demo", "!! the fight did not settle in time")
        finally:
            await intruder.close()
        await self.settled(ids)
        self.report(ids)

    async def offline_method(self) -> None:
        from adapters.http.transport import HttpTransport
        from adapters.mqtt.transport import MqttTransport

        self.story.step(f"A device goes offline; a direct method call for it is held until it connects ({PUMP})")
        assert self.sidecar.emulator is not None
        cs = self.sidecar.emulator.register(PUMP)
        http = self.front("http")
        service = HttpTransport(service_connection_string=http.service_connection_string, host="127.0.0.1",
                                port=http.port, ssl=None, presence_interval=0.3)
        caller = Handler(Watched(service, "service", self.story, self.policy), policy=self.policy,
                         identity="service")
        pump = MqttTransport(cs, host="127.0.0.1", port=self.front("mqtt").port, ssl=None, subscribe=("methods",))
        answering: asyncio.Task[None] | None = None
        await caller.start()
        try:
            self.story.line("service", f"POST /twins/{PUMP}/methods reboot (the device is offline)")
            call = asyncio.ensure_future(caller.request(
                InvokeMethod(PUMP, "reboot", {"delay": 0}, response_timeout=5), timeout=20))
            if await self.until(lambda: caller.held(PUMP) > 0, 10):
                self.story.line("handler", f"holding {caller.held(PUMP)} call(s) for {PUMP}")
            await asyncio.sleep(1.0)
            await pump.connect()
            self.story.line(PUMP, "connected over MQTT and subscribed to direct methods")
            answering = asyncio.ensure_future(self._answer_methods(pump))
            async with asyncio.timeout(STEP_TIMEOUT):
                result = await call
            status = getattr(result, "status", None)
            payload = getattr(result, "payload", result)
            self.story.line("service", f"released and delivered: status {status}, payload {payload}")
        finally:
            await cancel_and_wait(answering)
            await pump.close()
            await caller.close()

    async def _answer_methods(self, pump: Any) -> None:
        async for event in pump.events():
            if isinstance(event, Inbound) and isinstance(event.payload, MethodCall):
                self.story.line(PUMP, f"runs method {event.payload.name} and answers 200")
                await pump.request(RespondMethod(event.payload.rid, 200, {"rebooted": True}), timeout=5)

    async def quota(self) -> None:
        device = DEVICES["http"]
        self.story.step(f"Daily quota used up: the hub answers 403002 ({device}, HTTP)")
        now = time.time()
        err = make_error(_QUOTA, transport="http", device_id=device)
        shipped, _ = Policy(PolicyConfig()).step(err, History(identity=device), now=now, rand=random.Random(),
                                                 op=PolicyOperation(1, now, device))
        if isinstance(shipped, ParkUntil):
            quota = PolicyConfig().quota
            self.story.line("policy", f"the shipped policy parks {device} until {_utc(shipped.until)} "
                                      f"(in {(shipped.until - now) / 3600:.1f} h): the quota resets at "
                                      f"{_utc(next_utc_midnight(now))} + up to {quota.reset_jitter:g} s of jitter, "
                                      f"with one probe every {quota.probe_interval:g} s before that")
        self.story.line("policy", f"not waiting for that: the demo policy probes after "
                                  f"{self.policy.config.quota.probe_interval:g} s, and the emulator's quota is "
                                  f"back by then")
        self.hub.plan.add(Operation.TELEMETRY, _QUOTA, device=device, transport="http", times=1)
        ids = await self.post(device, 1)
        await self.settled(ids)
        ids += await self.post(device, 1)
        await self.settled(ids)
        self.report(ids)

    async def refusal(self) -> None:
        device = DEVICES["amqp"]
        self.story.step(f"A message the hub refuses for good: 413001 on the AMQP delivery ({device})")
        self.hub.plan.add(Operation.TELEMETRY, _TOO_LARGE, device=device, transport="amqp", times=1)
        ids = await self.post(device, 1)
        await self.settled(ids)
        ids += await self.post(device, 1)
        await self.settled(ids)
        self.report(ids)

    # -- the end --------------------------------------------------------------------------------------

    async def hold(self, code: int) -> None:
        """``--keep-running``: leave the sidecar, its status page and the emulator up until SIGINT/SIGTERM, so
        the page (and ``iothub-gateway status``) can be looked at after the story."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        try:
            self.story.say()
            self.story.say(f"Still running (--keep-running): status page {self.url}/, "
                           f"`iothub-gateway status --url {self.url}`; press Ctrl-C to stop"
                           + (" (exit 1: see the summary)" if code else ""))
            await stop.wait()
            self.story.say("Stopping.")
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def drain(self) -> dict[str, Any]:
        await self.settled(self.accepted, timeout=15)
        received = [mid for mid in self.hub.received_ids() if mid is not None]
        seen = set(received)
        counts = {"delivered": 0, "dead": 0, "pending": 0}
        lost: list[str] = []
        dead_codes: dict[int, int] = {}
        for mid in self.accepted:
            item = self.sidecar.outbox.get(mid)
            if item is None:
                lost.append(mid)
            elif item.status == "delivered":
                counts["delivered"] += 1
                if mid not in seen:
                    lost.append(mid)  # marked delivered but the hub never saw it
            elif item.status == "dead":
                counts["dead"] += 1
                if item.code is not None:
                    dead_codes[item.code] = dead_codes.get(item.code, 0) + 1
            else:
                counts["pending"] += 1
        mine = set(self.accepted)
        duplicates = sum(1 for mid in received if mid in mine) - len(seen & mine)
        return {"counts": counts, "lost": lost, "duplicates": duplicates, "dead_codes": dead_codes,
                "distinct": len(seen & mine)}

    def summary(self, result: dict[str, Any]) -> int:
        s = self.story
        counts = result["counts"]
        dead = ", ".join(f"{code} {lookup(code).name}" for code in sorted(result["dead_codes"])) or "none"
        s.say()
        s.say("== Summary")
        s.say(f"  sent (202 Accepted) = {len(self.accepted)}")
        s.say(f"  delivered = {counts['delivered']} (the hub saw {result['distinct']} distinct ids, "
              f"{result['duplicates']} duplicate(s))")
        s.say(f"  dead-lettered = {counts['dead']} ({dead})")
        s.say(f"  pending = {counts['pending']}")
        s.say(f"  lost = {len(result['lost'])}")
        return 0 if not result["lost"] and counts["pending"] == 0 else 1


async def _no_refresh() -> float | None:
    return None


async def run_demo(out: TextIO = sys.stdout, *, keep_running: bool = False) -> int:
    """Play the story; 0 when every accepted message was delivered or dead-lettered (lost = 0).
    ``keep_running``: then keep everything up until SIGINT or SIGTERM."""
    for name in ("gateway", "adapters", "proton"):  # the story prints what matters; keep the logs quiet
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="iothub-gateway-demo-") as tmp:
        return await Demo(out, Path(tmp), keep_running=keep_running).run()


def main(out: TextIO = sys.stdout, *, keep_running: bool = False) -> int:
    """``iothub-gateway demo``: the exit code (1 if any accepted message was lost or left pending)."""
    return asyncio.run(run_demo(out, keep_running=keep_running))
