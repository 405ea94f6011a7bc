"""``iothub-gateway``: look codes up, classify a raw transport failure, run the sidecar.

Bad input exits 2 with one line on stderr, never a traceback: the CLI is used from shell scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from gateway.codes import CodeInfo, all_codes, by_name, lookup
from gateway.errors import IoTHubError

__all__ = ["main", "markdown_table", "package_version"]


class UsageError(Exception):
    """Bad input from the command line: reported in one line, exit 2."""


def markdown_table() -> str:
    """The full code table as Markdown, one row per catalog code (the docs site generates its own pages)."""
    lines = [
        "| code | name | HTTP | transports | transient | action | origin | description |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in all_codes():
        aliases = ""
        if row.aliases or row.alias_codes:
            aliases = " (also " + ", ".join([*row.aliases, *map(str, row.alias_codes)]) + ")"
        lines.append(
            f"| {row.code} | {row.name}{aliases} | {row.http_status or 'N/A'} | {', '.join(sorted(row.transports))}"
            f" | {'yes' if row.transient else 'no'} | {row.action.value} | {row.origin} | {row.description} |"
        )
    return "\n".join(lines) + "\n"


def _resolve(text: str) -> CodeInfo:
    row = by_name(text)
    if row is not None:
        return row
    try:
        return lookup(text)
    except ValueError as exc:
        raise UsageError(f"{exc} (nor a code name)") from None


def _cmd_codes(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps([row.to_dict() for row in all_codes()], indent=1))
    elif args.markdown:
        sys.stdout.write(markdown_table())
    else:
        for row in all_codes():
            status = row.http_status or "N/A"
            print(f"{row.code}  {row.name:<48} {status!s:>4}  {row.action.value:<22} {row.description}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    row = _resolve(args.code)
    if args.json:
        print(json.dumps(row.to_dict(), indent=1))
        return 0
    print(f"{row.code} {row.name}")
    if not row.known:
        print("  (not in the table: resolved to its status family)")
    print(f"  HTTP status: {row.http_status or 'N/A (MQTT/AMQP only)'}")
    print(f"  transports:  {', '.join(sorted(row.transports))}")
    print(f"  transient:   {'yes' if row.transient else 'no'}")
    print(f"  action:      {row.action.value}")
    print(f"  defined by:  {'IoT Hub' if row.origin == 'iothub' else 'this gateway'}")
    if row.aliases or row.alias_codes:
        print(f"  aliases:     {', '.join([*row.aliases, *map(str, row.alias_codes)])}")
    print(f"  {row.description}")
    return 0


def _pairs(items: Sequence[str], sep: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, found, value = item.partition(sep)
        if not found or not key.strip():
            raise UsageError(f"bad {what} {item!r}: expected 'name{sep}value'")
        out[key.strip()] = value.strip()
    return out


def _int(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(f"bad {what} {text!r}: expected a number") from None


def _cmd_classify(args: argparse.Namespace) -> int:
    chosen = [x for x in (args.http, args.mqtt, args.topic, args.amqp) if x is not None]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --http, --mqtt, --topic or --amqp")
    result: IoTHubError | None
    if args.http is not None:
        from adapters.http import translate as http_translate

        headers = _pairs(args.header, ":", "header")
        result = _call(lambda: http_translate(_int(args.http, "HTTP status"), headers, args.body))
    elif args.mqtt is not None:
        from adapters.mqtt import translate as mqtt_translate

        props = _pairs(args.property, "=", "property")
        result = _call(
            lambda: mqtt_translate(
                _int(args.mqtt, "reason code"),
                protocol_version=args.mqtt_version,
                packet=args.packet,
                properties=props or None,
            )
        )
    elif args.topic is not None:
        from adapters.mqtt import translate_topic

        result = _call(lambda: translate_topic(args.topic, args.payload))
    else:
        from adapters.amqp import translate as amqp_translate

        info = _pairs(args.info, "=", "info entry")
        result = _call(lambda: amqp_translate(args.amqp, args.description, info or None))
    if result is None:
        print(json.dumps({"error": None}) if args.json else "not an error")
        return 0
    print(json.dumps(result.to_dict(), indent=1) if args.json else str(result))
    if not args.json:
        print(f"  action: {result.action.value}; retryable: {'yes' if result.retryable else 'no'}; "
              f"exact: {'yes' if result.exact else 'no'}" + (f"; tracking id: {result.tracking_id}"
                                                              if result.tracking_id else ""))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from gateway.sidecar.service import run

    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"bad port {args.port}: expected 0-65535 (0 picks a free port)")
    return run(args.config, port=args.port, log_format=args.log_format)


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.sidecar.demo import main as demo

    return demo(keep_running=args.keep_running)


DEFAULT_URL = "http://127.0.0.1:8780"  #: the sidecar's default [api] address
DEFAULT_TOKEN_ENV = "IOTHUB_GATEWAY_TOKEN"  #: the variable configs/gateway.toml suggests for [api] token_env


class StatusError(Exception):
    """The sidecar could not be asked (down, refused, not a sidecar): one line, exit 1."""


def _fetch_page(url: str, token: str | None, timeout: float, after: str | None) -> dict[str, object]:
    """One page of GET {url}/v1/devices. Any failure is a one-line StatusError naming the URL."""
    import urllib.error
    import urllib.parse
    import urllib.request

    query = "?limit=1000" + (f"&after={urllib.parse.quote(after, safe='')}" if after is not None else "")
    request = urllib.request.Request(url.rstrip("/") + "/v1/devices" + query, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        hint = " (give the token with --token-env)" if exc.code == 401 else ""
        raise StatusError(f"{url} answered {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusError(f"cannot reach a sidecar at {url}: {getattr(reason, 'strerror', None) or reason}") from None
    except ValueError:
        raise StatusError(f"{url} did not answer JSON: is it an iothub-gateway sidecar?") from None
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
        raise StatusError(f"{url}/v1/devices has no device list: is it an iothub-gateway sidecar?")
    return data


def _fetch_devices(url: str, token: str | None, timeout: float) -> list[dict[str, object]]:
    """Every device, page by page (the API answers at most 1,000 per request and says where to go on)."""
    devices: list[dict[str, object]] = []
    after: str | None = None
    seen: set[str] = set()
    while True:
        page = _fetch_page(url, token, timeout, after)
        items = page["devices"]
        assert isinstance(items, list)
        devices.extend(d for d in items if isinstance(d, dict))
        nxt = page.get("next")
        if not isinstance(nxt, str) or not items or nxt in seen:  # the last page (or a cursor going round)
            return devices
        seen.add(nxt)
        after = nxt


def status_table(devices: Sequence[dict[str, object]]) -> str:
    """One row per device: state, queue, delivered / dead counts and the latest error."""
    header = ("DEVICE", "PROTOCOL", "STATE", "SINCE", "QUEUED", "DELIVERED", "DEAD", "LAST ERROR")
    rows: list[tuple[str, ...]] = [header]
    for d in devices:
        raw = d.get("messages")
        messages: dict[str, object] = raw if isinstance(raw, dict) else {}
        err = d.get("last_error")
        last = f"{err.get('code')} {err.get('name')} at {err.get('at')}" if isinstance(err, dict) else "-"
        rows.append(tuple(str(x) for x in (d.get("id"), d.get("protocol"), d.get("state"), d.get("since") or "-",
                                           d.get("queued", 0), messages.get("delivered", 0),
                                           messages.get("dead", 0), last)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
                     for row in rows) + "\n"


def _cmd_status(args: argparse.Namespace) -> int:
    if not args.url.startswith(("http://", "https://")):
        raise UsageError(f"bad --url {args.url!r}: expected http://host:port")
    token = os.environ.get(args.token_env) if args.token_env else None
    try:
        devices = _fetch_devices(args.url, token, args.timeout)
    except StatusError as exc:
        print(f"iothub-gateway status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(devices, indent=1))
    elif not devices:
        print("no devices configured")
    else:
        sys.stdout.write(status_table(devices))
    return 0


def _call(fn: Callable[[], IoTHubError | None]) -> IoTHubError | None:
    try:
        return fn()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _cmd_emulator(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.emulator.serve import load_faults, serve

    if getattr(args, "emulator_command", None):  # fault / messages / c2d: talk to a running emulator
        from gateway.emulator.admin import run_command

        try:
            return run_command(args)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    for path in (args.tls_cert, args.tls_key, args.faults):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"no such file: {path}")
    try:
        faults = load_faults(args.faults) if args.faults else []
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    ports = {"http": args.http_port, "mqtt": args.mqtt_port, "amqp": args.amqp_port}
    try:
        asyncio.run(serve(host=args.host, ports=ports, devices=args.device or ["device-1"], hub_name=args.hub_name,
                          cert_file=args.tls_cert, key_file=args.tls_key, faults=faults,
                          admin_port=args.admin_port, registry=args.registry))
    except ValueError as exc:  # an unreadable --registry
        raise UsageError(str(exc)) from None
    except OSError as exc:
        print(f"iothub-gateway emulator: cannot listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def package_version() -> str:
    """The installed distribution's version: one source of truth (pyproject.toml), never a second literal."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iothub-error-adapter")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iothub-gateway",
        description="Normalize Azure IoT Hub transport failures (HTTP, MQTT, AMQP) to six-digit codes.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("codes", help="print the code table", description="Print the whole code catalog.")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="as JSON")
    fmt.add_argument("--markdown", action="store_true", help="the whole table as Markdown")
    p.set_defaults(func=_cmd_codes)

    p = sub.add_parser("explain", help="explain one code", description="Explain a code (number, alias or name).")
    p.add_argument("code", help="a six-digit code such as 429001, or a name such as ThrottlingException")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=_cmd_explain)

    p = sub.add_parser(
        "classify",
        help="classify a raw transport failure",
        description="Turn one raw failure into its six-digit code and action. Give exactly one of "
        "--http, --mqtt, --topic or --amqp.",
    )
    p.add_argument("--http", metavar="STATUS", help="an HTTP status, e.g. 429")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'", help="a response header")
    p.add_argument("--body", help="the response body")
    p.add_argument("--mqtt", metavar="CODE", help="an MQTT CONNACK / reason code (decimal or 0x..)")
    p.add_argument("--mqtt-version", type=int, choices=(3, 4, 5), default=4, help="MQTT protocol level")
    p.add_argument("--packet", choices=("connack", "disconnect", "puback", "suback"), default="connack")
    p.add_argument("--property", action="append", default=[], metavar="KEY=VALUE",
                   help="an MQTT 5 user property such as status=0501")
    p.add_argument("--topic", help="an MQTT response topic such as $iothub/twin/res/429/?$rid=1")
    p.add_argument("--payload", help="the payload that came with --topic")
    p.add_argument("--amqp", metavar="CONDITION", help="an AMQP error condition such as amqp:link:stolen")
    p.add_argument("--description", help="the AMQP condition's description")
    p.add_argument("--info", action="append", default=[], metavar="KEY=VALUE", help="an AMQP condition info entry")
    p.add_argument("--json", action="store_true", help="print the error's to_dict() as JSON")
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser(
        "run",
        help="run the sidecar (local API, durable outbox, upstream connections)",
        description="Run the sidecar. Prints the local API's URL on stderr on start (stdout stays empty); "
        "SIGTERM or Ctrl-C stops it cleanly. "
        "Without --config it reads configs/gateway.toml: the bundled emulator as upstream, with demo devices.",
    )
    p.add_argument("--config", metavar="PATH", help="the sidecar's TOML config (default: configs/gateway.toml)")
    p.add_argument("--port", type=int, metavar="N", help="the API port (overrides [api] port; 0 picks a free one)")
    p.add_argument("--log-format", choices=("text", "json"), help="log lines as text (default) or JSON")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "demo",
        help="play a scripted story of IoT Hub failures through the sidecar on the bundled emulator",
        description="Start the sidecar on the bundled emulator and play throttling, an outage, an identity "
        "fight, a held direct method and quota exhaustion across HTTP, MQTT and AMQP, printing each code and "
        "the handler's action, then a summary (lost = 0). Uses a short demo policy; takes about 20 seconds.",
    )
    p.add_argument("--keep-running", action="store_true",
                   help="after the story, keep the sidecar and its status page up until Ctrl-C")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "status",
        help="show each device of a running sidecar",
        description="Ask a running sidecar (GET /v1/devices) and print one row per device: state, queued, "
        "delivered and dead-lettered messages, the latest error. Exits 1 if the sidecar cannot be asked.",
    )
    p.add_argument("--url", default=DEFAULT_URL, help=f"the sidecar's API (default {DEFAULT_URL})")
    p.add_argument("--token-env", default=DEFAULT_TOKEN_ENV, metavar="NAME",
                   help=f"the variable holding the API's bearer token, if it has one (default {DEFAULT_TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="give up after this long")
    p.add_argument("--json", action="store_true", help="print the devices as JSON")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser(
        "emulator",
        help="run the local IoT Hub emulator on its own",
        description="Serve IoT Hub's HTTP, MQTT and AMQP device surfaces locally, so any client (our adapters, "
        "Azure's SDKs, your firmware) can be pointed at it. Prints each front's URL, the admin API's URL, "
        "the service and device connection strings; faults come from --faults or, while it runs, "
        "`iothub-gateway emulator fault add`.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--http-port", type=int, default=0, help="HTTP(S) port (0: a free one; IoT Hub uses 443)")
    p.add_argument("--mqtt-port", type=int, default=0, help="MQTT port (0: a free one; IoT Hub uses 8883)")
    p.add_argument("--amqp-port", type=int, default=0, help="AMQP port (0: a free one; IoT Hub uses 5671)")
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate chain: serve TLS on every front")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--device", action="append", metavar="ID", help="register a device (repeatable)")
    p.add_argument("--hub-name", default="emulator.azure-devices.net", help="the hub's host name in tokens")
    p.add_argument("--faults", metavar="FILE", help="faults to answer: a TOML file of [[faults]] or a JSON list")
    p.add_argument("--admin-port", type=int, default=0, help="the admin API's port on loopback (0: a free one)")
    p.add_argument("--registry", metavar="FILE", help="keep device identities and keys in this JSON file "
                   "(default: random keys for this run only)")
    from gateway.emulator.admin import add_commands

    add_commands(p)  # emulator fault add|clear|list, emulator messages, emulator c2d send|feedback
    p.set_defaults(func=_cmd_emulator)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UsageError as exc:
        print(f"iothub-gateway {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `iothub-gateway codes | head`: the reader left, which is fine
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return 0


if __name__ == "__main__":
    sys.exit(main())
