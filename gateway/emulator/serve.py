"""``iothub-gateway emulator``: the local IoT Hub as a standalone process, for any client to point at.

Azure's own SDKs, a user's firmware or our adapters connect to it like to a hub: HTTPS, MQTT(S) and
AMQP(S) on the ports given (IoT Hub's own are 443, 8883 and 5671), with SAS authentication, and the
faults of a fault file answered in each transport's wire form.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gateway.emulator.admin import AdminServer
from gateway.emulator.faults import Fault, FaultPlan
from gateway.emulator.front import Front, FrontConfig, load_front
from gateway.emulator.hub import Hub

__all__ = ["load_faults", "serve", "start_fronts"]

_SCHEMES = {"http": ("http", "https"), "mqtt": ("mqtt", "mqtts"), "amqp": ("amqp", "amqps")}


def load_faults(path: str | Path) -> list[Fault]:
    """Faults from a TOML file (``[[faults]]`` tables) or a JSON list; a clear ValueError otherwise."""
    text = Path(path).read_text()
    try:
        data: Any = tomllib.loads(text).get("faults", []) if str(path).endswith(".toml") else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(d, Mapping) for d in data):
        raise ValueError(f"{path}: expected a list of fault tables")
    faults = []
    for n, entry in enumerate(data, 1):
        try:
            faults.append(Fault.from_dict(entry))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: fault {n}: {exc}") from None
    return faults


async def start_fronts(
    hub: Hub,
    *,
    host: str = "127.0.0.1",
    ports: Mapping[str, int] | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    protocols: Sequence[str] = ("http", "mqtt", "amqp"),
) -> dict[str, Front]:
    """Start the fronts for ``hub`` (TLS on all of them when a certificate is given)."""
    context: ssl.SSLContext | None = None
    if cert_file is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_file, key_file)
    fronts: dict[str, Front] = {}
    try:
        for protocol in protocols:
            cls = load_front(protocol)
            if cls is None:
                raise RuntimeError(f"this build has no {protocol} front")
            config = FrontConfig(host, (ports or {}).get(protocol, 0), context)
            # AMQP: the SASL shim offers MSSBCBS (Azure's uamqp clients need it) and terminates TLS
            extra: dict[str, Any] = {"offer_mssbcbs": True} if protocol == "amqp" else {}
            front: Front = cls(hub, config, **extra)
            await front.start()
            fronts[protocol] = front
        http = fronts.get("http")
        if http is not None and hasattr(http, "websocket_ports"):  # MQTT / AMQP over WebSockets on the HTTPS port
            for protocol in ("mqtt", "amqp"):
                plain = getattr(fronts.get(protocol), "plain_port", 0)
                if plain:
                    http.websocket_ports[protocol] = plain
    except BaseException:
        for front in fronts.values():
            with contextlib.suppress(Exception):
                await front.stop()
        raise
    return fronts


async def serve(
    *,
    host: str,
    ports: Mapping[str, int],
    devices: Sequence[str],
    hub_name: str,
    cert_file: str | None = None,
    key_file: str | None = None,
    faults: Sequence[Fault] = (),
    out: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
    admin_port: int | None = 0,
    registry: str | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGINT / SIGTERM), printing where to connect.

    Keys are random per run unless ``registry`` names a file of them (written back at the end, so the
    devices and the service key survive a restart). ``admin_port`` None: no admin API.
    """
    hub = Hub(hub_name, FaultPlan(faults))
    if registry is not None and Path(registry).exists():
        hub.load_registry(registry)
    for device in devices:
        hub.add_device(device)
    if registry is not None:
        hub.save_registry(registry)
    fronts = await start_fronts(hub, host=host, ports=ports, cert_file=cert_file, key_file=key_file)
    admin: AdminServer | None = None
    if admin_port is not None:
        admin = AdminServer(hub, "127.0.0.1", admin_port)
        try:
            await admin.start()
        except BaseException:
            for front in fronts.values():
                with contextlib.suppress(Exception):
                    await front.stop()
            raise
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        tls = 1 if cert_file else 0
        for protocol, front in fronts.items():
            out(f"{protocol}: {_SCHEMES[protocol][tls]}://{host}:{front.port}")
        if admin is not None:
            out(f"admin: {admin.url}")
        out(f"service: {hub.service_connection_string}")
        for registered in hub.devices():
            out(f"device {registered.device_id}: {hub.connection_string(registered.device_id)}")
        out(f"faults: {len(faults)} scheduled; stop with Ctrl-C")
        sys.stdout.flush()
        await stop.wait()
    finally:
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.stop()
        for front in fronts.values():
            with contextlib.suppress(Exception):
                await front.stop()
        if registry is not None:
            with contextlib.suppress(OSError):
                hub.save_registry(registry)
