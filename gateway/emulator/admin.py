"""The emulator's admin surface: change faults while it runs, read the telemetry it received, queue
cloud-to-device messages, read C2D feedback. An HTTP API on loopback (:class:`AdminServer`) and the
client that ``iothub-gateway emulator fault|messages|c2d`` uses (:func:`run_command`).

It is a test harness's control plane, not part of IoT Hub: no SAS, so it binds loopback by default.

    GET    /faults                 the plan, in order (each with its ``id`` and ``hits``)
    POST   /faults                 add one (a fault table as JSON, the fields of a fault file) -> 201
    DELETE /faults                 clear all
    DELETE /faults/{id}            remove one -> 204, or 404
    GET    /messages?since=N&device=D   telemetry after the N-th message -> {"messages": [...], "next": M}
    POST   /devices/{id}/c2d       {"body" | "body_base64", "properties", "message_id", "correlation_id", "ack"}
    GET    /feedback               C2D feedback records
    GET    /devices                the registry with each device's connection string
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from gateway.emulator.faults import Fault
from gateway.emulator.hub import Hub, Received

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["AdminServer", "add_commands", "run_command"]

ADMIN_ENV = "IOTHUB_EMULATOR_ADMIN"  #: where the CLI finds the admin URL when ``--admin`` is not given
_MAX_BODY = 256 * 1024


def message_dict(received: Received) -> dict[str, Any]:
    """One received telemetry message as JSON: the body as text when it is UTF-8, always as base64."""
    try:
        text: str | None = received.body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {"device_id": received.device_id, "message_id": received.message_id, "transport": received.transport,
            "properties": dict(received.properties), "body": text,
            "body_base64": base64.b64encode(received.body).decode()}


class AdminServer:
    """The admin API for one hub, on its own port (``port=0``: a free one)."""

    def __init__(self, hub: Hub, host: str = "127.0.0.1", port: int = 0) -> None:
        self.hub = hub
        self.host = host
        self._want = port
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application(client_max_size=_MAX_BODY * 2)
        app.router.add_get("/faults", self._faults)
        app.router.add_post("/faults", self._add_fault)
        app.router.add_delete("/faults", self._clear_faults)
        app.router.add_delete("/faults/{id}", self._remove_fault)
        app.router.add_get("/messages", self._messages)
        app.router.add_post("/devices/{device}/c2d", self._c2d)
        app.router.add_get("/feedback", self._feedback)
        app.router.add_get("/devices", self._devices)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._want)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    @staticmethod
    def _error(status: int, message: str) -> web.Response:
        from aiohttp import web

        return web.json_response({"error": message}, status=status)

    async def _faults(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        return web.json_response([f.to_dict() for f in self.hub.plan.pending()])

    async def _add_fault(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        try:
            data = json.loads(await request.read())
            if not isinstance(data, dict):
                raise ValueError("expected a fault table (a JSON object)")
            fault = self.hub.plan.append(Fault.from_dict(data))
        except (ValueError, TypeError) as exc:
            return self._error(400, str(exc))
        return web.json_response(fault.to_dict(), status=201)

    async def _clear_faults(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        self.hub.plan.clear()
        return web.Response(status=204)

    async def _remove_fault(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        try:
            fault_id = int(request.match_info["id"])
        except ValueError:
            return self._error(400, "a fault id is a number")
        if not self.hub.plan.remove(fault_id):
            return self._error(404, f"no fault {fault_id} (used up, or never was)")
        return web.Response(status=204)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        try:
            since = max(int(request.query.get("since", "0")), 0)
        except ValueError:
            return self._error(400, "since is a number")
        items, after = self.hub.received_since(since, request.query.get("device") or None)
        return web.json_response({"messages": [message_dict(r) for r in items], "next": after})

    async def _c2d(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        device_id = request.match_info["device"]
        try:
            data = json.loads(await request.read() or b"{}")
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            if "body_base64" in data:
                body = base64.b64decode(str(data["body_base64"]), validate=True)
            else:
                body = str(data.get("body", "")).encode()
            props = data.get("properties") or {}
            if not isinstance(props, dict):
                raise ValueError("properties must be an object")
            mid = self.hub.send_c2d(device_id, body, message_id=data.get("message_id"),
                                    properties={str(k): str(v) for k, v in props.items()},
                                    correlation_id=data.get("correlation_id"), ack=str(data.get("ack", "none")))
        except KeyError:
            return self._error(404, f"no device {device_id!r}")
        except OverflowError as exc:
            return self._error(403, str(exc))
        except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
            return self._error(400, str(exc))
        return web.json_response({"message_id": mid}, status=201)

    async def _feedback(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        return web.json_response([{"device_id": f.device_id, "message_id": f.message_id, "status": f.status,
                                   "description": f.description} for f in list(self.hub.feedback)])

    async def _devices(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        return web.json_response([{"device_id": d.device_id, "enabled": d.enabled,
                                   "connection_string": self.hub.connection_string(d.device_id),
                                   "online": self.hub.is_online(d.device_id)} for d in self.hub.devices()])


# -- the CLI side ----------------------------------------------------------------------------------------


def add_commands(parser: argparse.ArgumentParser) -> None:
    """``emulator fault add|clear|list``, ``emulator messages``, ``emulator c2d send`` under ``parser``."""
    sub = parser.add_subparsers(dest="emulator_command", metavar="[COMMAND]")
    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument("--admin", metavar="URL", help=f"the running emulator's admin URL (default: ${ADMIN_ENV})")

    fault = sub.add_parser("fault", help="change the running emulator's faults")
    fsub = fault.add_subparsers(dest="fault_command", required=True, metavar="ACTION")
    add = fsub.add_parser("add", parents=[admin], help="add a fault",
                          description="Add one fault; the fields are a fault file's ([[faults]] keys).")
    add.add_argument("operation", help="connect, telemetry, twin_get, twin_patch, method, c2d_receive, c2d_settle, any")
    add.add_argument("--kind", help="error (default), drop, no_ack, delay or stall")
    add.add_argument("--code", help="the six-digit code (or its name) an error answers with")
    add.add_argument("--device", help="only this device")
    add.add_argument("--transport", choices=("http", "mqtt", "amqp"), help="only this transport")
    add.add_argument("--times", help="how many times (a number, or 'forever')")
    add.add_argument("--for-seconds", type=float, help="how long, from its first match")
    add.add_argument("--retry-after", type=float, help="seconds the hub asks to wait (HTTP, AMQP)")
    add.add_argument("--delay", type=float, help="seconds a delay fault waits")
    add.add_argument("--form", help="a front's wire-form hint")
    add.add_argument("--match-property", action="append", default=[], metavar="KEY=VALUE",
                     help="only messages carrying this application property (repeatable)")
    add.add_argument("--match-body", help="only messages whose body contains this text")
    clear = fsub.add_parser("clear", parents=[admin], help="remove faults (all, or one by id)")
    clear.add_argument("id", nargs="?", type=int, help="the fault's id (from `fault list`)")
    fsub.add_parser("list", parents=[admin], help="list the faults still pending")

    messages = sub.add_parser("messages", parents=[admin], help="print the telemetry the emulator received")
    messages.add_argument("--device", help="only this device")
    messages.add_argument("--since", type=int, default=0, help="skip the first N messages ever received")

    c2d = sub.add_parser("c2d", help="cloud-to-device messages")
    csub = c2d.add_subparsers(dest="c2d_command", required=True, metavar="ACTION")
    send = csub.add_parser("send", parents=[admin], help="queue a cloud-to-device message for a device")
    send.add_argument("device", help="the device id")
    send.add_argument("body", help="the message body (text)")
    send.add_argument("--property", action="append", default=[], metavar="KEY=VALUE", help="an application property")
    send.add_argument("--message-id", help="the message id (default: the hub makes one)")
    send.add_argument("--correlation-id", help="the correlation id")
    send.add_argument("--ack", choices=("none", "positive", "negative", "full"), default="none",
                      help="the feedback to ask for")
    csub.add_parser("feedback", parents=[admin], help="print the feedback recorded so far")


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, not {item!r}")
        out[key] = value
    return out


def _request(base: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base.rstrip("/") + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        with contextlib.suppress(ValueError, AttributeError):
            detail = json.loads(detail).get("error", detail)
        raise ValueError(f"the emulator refused: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"cannot reach the emulator's admin API at {base}: {exc}") from None
    return json.loads(raw) if raw else None


def run_command(args: argparse.Namespace, out: Any = None) -> int:
    """Run one admin subcommand against a running emulator; 0 on success, 1 when it cannot be reached.

    Raises ``ValueError`` for a usage problem or a refusal (the CLI prints it as one line, exit 2).
    """
    write = out or print
    base = args.admin or os.environ.get(ADMIN_ENV)
    if not base:
        raise ValueError(f"where is the emulator? give --admin URL (printed as 'admin: ...' at its start) "
                         f"or set {ADMIN_ENV}")
    try:
        if args.emulator_command == "fault":
            if args.fault_command == "add":
                table: dict[str, Any] = {"operation": args.operation}
                for name in ("kind", "device", "transport", "form", "match_body"):
                    if getattr(args, name) is not None:
                        table[name] = getattr(args, name)
                for name in ("for_seconds", "retry_after", "delay"):
                    if getattr(args, name) is not None:
                        table[name] = getattr(args, name)
                if args.code is not None:
                    table["code"] = int(args.code) if args.code.isdigit() else args.code
                if args.times is not None:
                    table["times"] = None if args.times == "forever" else int(args.times)
                if args.match_property:
                    table["match_property"] = _pairs(args.match_property, "--match-property")
                write(json.dumps(_request(base, "POST", "/faults", table)))
            elif args.fault_command == "clear":
                _request(base, "DELETE", "/faults" if args.id is None else f"/faults/{args.id}")
            else:
                for fault in _request(base, "GET", "/faults"):
                    write(json.dumps(fault))
        elif args.emulator_command == "messages":
            query = f"?since={args.since}" + (f"&device={quote(args.device)}" if args.device else "")
            for message in _request(base, "GET", "/messages" + query)["messages"]:
                write(json.dumps(message))
        elif args.c2d_command == "send":
            body = {"body": args.body, "properties": _pairs(args.property, "--property"), "ack": args.ack}
            if args.message_id:
                body["message_id"] = args.message_id
            if args.correlation_id:
                body["correlation_id"] = args.correlation_id
            answer = _request(base, "POST", f"/devices/{quote(args.device, safe='')}/c2d", body)
            write(answer["message_id"])
        else:
            for record in _request(base, "GET", "/feedback"):
                write(json.dumps(record))
    except ConnectionError as exc:
        print(f"iothub-gateway emulator: {exc}", file=sys.stderr)
        return 1
    return 0
