"""The sidecar's configuration: TOML, validated as a whole before anything starts.

Every problem is reported (one line each, naming the key), not just the first, so one edit fixes a file.
Secrets (device connection strings, the API bearer token) come from environment variables or files named
in the config; they may be written inline, but never have to be. The defaults are the demo: the bundled
emulator as upstream and one device per transport, so an empty file means the same as
``configs/gateway.toml``.

Devices are listed inline (``[[devices]]`` tables) or, for fleets, outside the config: ``[devices]``
with ``file`` (JSON Lines, one device per line), ``dir`` (one ``*.json`` or ``*.toml`` file per device,
``*.jsonl`` files of many) and/or ``registry`` (the emulator's registry file, for local runs). Entries
have the ``[[devices]]`` keys; a problem names the file and line.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.policy import Policy, PolicyConfig, PolicyConfigError, load_policy
from gateway.sas import ConnectionString

__all__ = [
    "MAX_DEVICES",
    "PROTOCOLS",
    "AmqpConfig",
    "ApiConfig",
    "ConfigError",
    "DeliveryConfig",
    "DeviceConfig",
    "LoggingConfig",
    "MetricsConfig",
    "OutboxConfig",
    "Secret",
    "SidecarConfig",
    "UpstreamConfig",
    "default_config_path",
    "default_outbox_path",
    "load_config",
    "parse_config",
]

PROTOCOLS: tuple[str, ...] = ("mqtt", "amqp", "http")
#: IoT Hub's device-id alphabet (up to 128 characters).
_DEVICE_ID = re.compile(r"[A-Za-z0-9\-:.+%_#*?!(),=@$']{1,128}")
_IOTHUB_PORTS = {"mqtt": 8883, "amqp": 5671, "http": 443}
#: Devices one sidecar accepts at most (all sources together): a bound on what a hostile list can cost.
MAX_DEVICES = 100_000
#: IoT Hub's limit of device identities on one AMQPS connection (the Azure Java SDK's, and the mux's default).
AMQP_DEVICES_PER_CONNECTION = 1000
_MAX_LINE = 64 * 1024  #: bytes per JSON Lines entry / per file in a devices dir
_MAX_PROBLEMS = 50  #: problems listed from device files; the rest are counted
_DEVICE_KEYS = frozenset({"id", "protocol", "connection_string", "connection_string_env", "connection_string_file",
                          "mqtt_version", "multiplex"})


class ConfigError(ValueError):
    """The configuration has problems; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class Secret:
    """A string that never shows itself in ``repr``/``str`` (logs, tracebacks, error messages)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"
    port: int = 8780
    token: Secret | None = None  #: bearer token; required when ``host`` is not loopback
    max_body: int = 256 * 1024  #: IoT Hub's device-to-cloud limit
    max_batch: int = 500  #: messages per POST .../messages/batch
    max_batch_body: int = 4 * 1024 * 1024  #: bytes per batch request (checked before it is all read)
    rate_limit: float = 2000.0  #: requests per second per client address (token bucket); 0 = off
    rate_burst: int = 4000


@dataclass(frozen=True)
class OutboxConfig:
    path: str = ""  #: empty: :func:`default_outbox_path` (one per config file)
    max_messages: int = 100_000
    ttl: float = 86_400.0  #: per-message deadline after acceptance (seconds); 0 = none
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    delivered_retention: float = 3600.0  #: seconds a delivered message stays readable, then it leaves the file
    delivered_max: int = 10_000  #: delivered messages kept at most (the newest)
    dead_letter_retention: float = 7 * 86_400.0  #: seconds a dead letter is kept for reading and replay
    dead_letter_max: int = 10_000  #: dead letters kept at most (the newest)


@dataclass(frozen=True)
class DeliveryConfig:
    max_inflight: int = 8  #: sends in flight per device
    shutdown_deadline: float = 10.0  #: on SIGTERM, how long in-flight sends may finish before being persisted
    c2d_poll_interval: float = 1.0  #: HTTP devices: seconds between C2D polls while an app listens
    c2d_max_held: int = 100  #: C2D messages held unsettled per device for apps; past that the hub keeps them
    twin_poll_interval: float = 30.0  #: HTTP devices: seconds between twin reads while an app streams desired
    #: a device with a backlog claims up to this many messages beyond ``2 * max_inflight`` at once (fewer
    #: commits per message), borrowed from ``claim_budget``, which all devices share (bodies held in memory)
    claim_ahead: int = 256
    claim_budget: int = 4096  #: messages claimed ahead of sending across all devices at most


@dataclass(frozen=True)
class LoggingConfig:
    format: Literal["text", "json"] = "text"
    level: str = "INFO"
    error_interval: float = 10.0  #: an identical warning/error is logged at most once per this many seconds


@dataclass(frozen=True)
class AmqpConfig:
    #: AMQP devices share connections (IoT Hub carries many device identities on one AMQPS connection):
    #: one thread for them all instead of one thread and one socket per device. Per device: ``multiplex``.
    multiplex: bool = True
    devices_per_connection: int = AMQP_DEVICES_PER_CONNECTION


@dataclass(frozen=True)
class MetricsConfig:
    #: per-device series (queue depth, connection state, last error) for at most this many devices, the
    #: ones needing attention first (not connected, then messages waiting), then by id; the rest are
    #: counted in the per-state aggregates only. Bounds the scrape at 10,000 devices. 0: none.
    per_device_max: int = 100


@dataclass(frozen=True)
class UpstreamConfig:
    kind: Literal["emulator", "iothub"] = "emulator"
    host_name: str = "emulator.azure-devices.net"  #: the emulated hub's name (emulator only)
    host: str | None = None  #: iothub: where sockets go (default: the connection string's HostName)
    tls: bool = True  #: iothub: False only for a loopback host (a local emulator in tests)
    ca_file: str | None = None  #: iothub: extra CA bundle; verification is always on
    ports: Mapping[str, int] = field(default_factory=dict)  #: per protocol; emulator: 0 = any free port


@dataclass(frozen=True)
class DeviceConfig:
    id: str
    protocol: str
    connection_string: Secret | None = None  #: None with the emulator (it issues the credentials)
    mqtt_version: int = 4  #: 4 (3.1.1, IoT Hub's classic surface) or 5 (exact codes in PUBACK and DISCONNECT)
    multiplex: bool | None = None  #: AMQP: share a connection (None: ``[amqp] multiplex``)

    def parsed(self) -> ConnectionString:
        if self.connection_string is None:
            raise ValueError(f"device {self.id!r} has no connection string")
        return ConnectionString.parse(self.connection_string.reveal())


_DEMO_DEVICES = (
    DeviceConfig("demo-mqtt", "mqtt"),
    DeviceConfig("demo-amqp", "amqp"),
    DeviceConfig("demo-http", "http"),
)


@dataclass(frozen=True)
class SidecarConfig:
    api: ApiConfig = ApiConfig()
    outbox: OutboxConfig = OutboxConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    logging: LoggingConfig = LoggingConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    policy: Policy = field(default_factory=Policy)
    devices: tuple[DeviceConfig, ...] = _DEMO_DEVICES
    source: str = "<defaults>"
    amqp: AmqpConfig = AmqpConfig()
    metrics: MetricsConfig = MetricsConfig()
    #: the emulator's registry file the devices came from (``[devices] registry``): its keys are loaded
    #: into the bundled emulator, so service tools using that file keep working
    registry: str | None = None

    @functools.cached_property
    def _by_id(self) -> dict[str, DeviceConfig]:
        return {device.id: device for device in self.devices}

    def device(self, device_id: str) -> DeviceConfig | None:
        return self._by_id.get(device_id)

    def multiplexed(self, device: DeviceConfig) -> bool:
        """Whether ``device`` shares an AMQP connection (its own ``multiplex``, else ``[amqp] multiplex``)."""
        if device.protocol != "amqp":
            return False
        return self.amqp.multiplex if device.multiplex is None else device.multiplex

    def secrets(self) -> list[str]:
        """Every secret value, so the redactor can blank them wherever they might surface."""
        out: list[str] = []
        if self.api.token is not None:
            out.append(self.api.token.reveal())
        for device in self.devices:
            if device.connection_string is not None:
                text = device.connection_string.reveal()
                out.append(text)
                try:
                    key = ConnectionString.parse(text).shared_access_key
                except ValueError:
                    key = None
                if key:
                    out.append(key)
        return out

    def outbox_path(self) -> Path:
        return Path(self.outbox.path).expanduser() if self.outbox.path else default_outbox_path(self.source)


def default_outbox_path(source: str | None = None) -> Path:
    """``$XDG_STATE_HOME/iothub-gateway/outbox-<hash>.sqlite3`` (``~/.local/state`` when unset), one per
    config file (``source``): two sidecars started from different configs never share an outbox, and a
    restart with the same config finds its pending messages again."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    key = source or "<defaults>"
    if not key.startswith("<"):
        key = str(Path(key).expanduser().resolve())
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return Path(base) / "iothub-gateway" / f"outbox-{digest}.sqlite3"


def default_config_path() -> Path | None:
    """``configs/gateway.toml`` in the working directory, else the one next to the package (a checkout)."""
    for candidate in (Path("configs/gateway.toml"), Path(__file__).resolve().parents[2] / "configs" / "gateway.toml"):
        if candidate.is_file():
            return candidate
    return None


def load_config(path: str | Path | None = None, *, env: Mapping[str, str] | None = None) -> SidecarConfig:
    """Read and validate a config file (None: :func:`default_config_path`, else the built-in defaults)."""
    chosen = Path(path) if path is not None else default_config_path()
    if chosen is None:
        return parse_config({}, source="<defaults>", env=env)
    try:
        with chosen.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError([f"{chosen}: no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"{chosen}: cannot read: {exc.strerror or exc}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{chosen}: not valid TOML: {exc}"]) from None
    except ValueError as exc:  # tomllib's int(): a number over Python's 4300-digit limit
        raise ConfigError([f"{chosen}: not usable TOML: {exc}"]) from None
    return parse_config(data, source=str(chosen), base=chosen.parent, env=env)


class _Check:
    """Collects problems while reading one parsed TOML document."""

    def __init__(self, source: str, base: Path | None, env: Mapping[str, str]) -> None:
        self.source = source
        self.base = base
        self.env = env
        self.problems: list[str] = []
        self.too_many = False  #: past MAX_DEVICES (said once; reading the files stops)

    def fail(self, where: str, text: str) -> None:
        self.problems.append(f"{self.source}: {where}: {text}")

    def table(self, data: Mapping[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, Mapping):
            self.fail(f"[{key}]", "expected a table")
            return {}
        return dict(value)

    def keys(self, data: Mapping[str, Any], where: str, known: set[str]) -> None:
        for key in data:
            if key not in known:
                self.fail(where, f"unknown key {key!r} (known: {', '.join(sorted(known))})")

    def number(self, data: Mapping[str, Any], key: str, where: str, default: float, *, minimum: float = 0.0,
               whole: bool = False, maximum: float | None = None) -> Any:
        if key not in data:
            return default
        raw = data[key]
        # An int is finite however long (math.isfinite would overflow converting a huge one to float).
        ok = not isinstance(raw, bool) and (isinstance(raw, int) or (isinstance(raw, float) and math.isfinite(raw)))
        if ok and whole and not isinstance(raw, int):
            ok = False
        if ok and not whole and isinstance(raw, int) and raw.bit_length() > 1000:
            ok = False  # no float can hold it
        if not ok or raw < minimum or (maximum is not None and raw > maximum):
            kind = "a whole number" if whole else "a number"
            bound = f" in [{minimum:g}, {maximum:g}]" if maximum is not None else f" >= {minimum:g}"
            self.fail(f"{where} {key}", f"expected {kind}{bound}, got {_show(raw)}")
            return default
        return int(raw) if whole else float(raw)

    def string(self, data: Mapping[str, Any], key: str, where: str, default: Any,
               choices: tuple[str, ...] | None = None) -> Any:
        if key not in data:
            return default
        raw = data[key]
        if not isinstance(raw, str) or (choices is not None and raw not in choices):
            want = f"one of {', '.join(repr(c) for c in choices)}" if choices else "a string"
            self.fail(f"{where} {key}", f"expected {want}, got {_show(raw)}")
            return default
        return raw

    def boolean(self, data: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
        if key not in data:
            return default
        raw = data[key]
        if not isinstance(raw, bool):
            self.fail(f"{where} {key}", f"expected true or false, got {_show(raw)}")
            return default
        return raw

    def path(self, text: str) -> Path:
        p = Path(text).expanduser()
        return p if p.is_absolute() or self.base is None else self.base / p

    def secret(self, data: Mapping[str, Any], stem: str, where: str, *, required: bool) -> Secret | None:
        """``stem`` (inline), ``stem_env`` (a variable's name) or ``stem_file`` (a path): at most one."""
        given = [k for k in (stem, f"{stem}_env", f"{stem}_file") if k in data]
        if len(given) > 1:
            self.fail(where, f"give only one of {', '.join(given)}")
            return None
        if not given:
            if required:
                self.fail(where, f"missing secret: set {stem}_env (an environment variable) or {stem}_file")
            return None
        key = given[0]
        raw = data[key]
        if not isinstance(raw, str) or not raw.strip():
            self.fail(f"{where} {key}", "expected a non-empty string")
            return None
        if key == stem:
            return Secret(raw.strip())
        if key.endswith("_env"):
            value = self.env.get(raw)
            if not value or not value.strip():
                self.fail(f"{where} {key}", f"missing secret: environment variable {raw} is not set")
                return None
            return Secret(value.strip())
        path = self.path(raw)
        try:
            text = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            self.fail(f"{where} {key}", f"missing secret: cannot read {path}: {exc.strerror or exc}")
            return None
        if not text:
            self.fail(f"{where} {key}", f"missing secret: {path} is empty")
            return None
        return Secret(text)


def _show(value: object) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = f"<a {type(value).__name__} too long to show>"
    return text if len(text) <= 60 else text[:57] + "..."


MIN_TOKEN_LENGTH = 12  #: characters; a shorter bearer token is refused at start


def _weak_token(token: str) -> str | None:
    """Why a bearer token is refused, or None. A token guessable by a short search would let anyone who
    reaches the port in, and a short one could not be told apart from ordinary text by the redactor."""
    if len(token) < MIN_TOKEN_LENGTH:
        return f"it has {len(token)} characters; use at least {MIN_TOKEN_LENGTH} (e.g. `openssl rand -hex 16`)"
    if not (token.isascii() and token.isprintable()) or any(ch.isspace() for ch in token):
        return "use printable ASCII without spaces (it travels in an HTTP header)"
    if len(set(token)) < 4:
        return "it repeats too few distinct characters"
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_config(
    data: Mapping[str, Any], *, source: str = "<config>", base: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> SidecarConfig:
    """Validate parsed TOML; raises :class:`ConfigError` listing every problem found."""
    c = _Check(source, base, os.environ if env is None else env)
    c.keys(data, "top level", {"api", "outbox", "delivery", "logging", "upstream", "policy", "devices", "amqp",
                               "metrics"})

    raw = c.table(data, "api")
    c.keys(raw, "[api]", {"host", "port", "token", "token_env", "token_file", "max_body", "max_batch",
                          "max_batch_body", "rate_limit", "rate_burst"})
    d = ApiConfig()
    api = ApiConfig(
        host=c.string(raw, "host", "[api]", d.host),
        port=c.number(raw, "port", "[api]", d.port, whole=True, maximum=65535),
        token=c.secret(raw, "token", "[api]", required=False),
        max_body=c.number(raw, "max_body", "[api]", d.max_body, whole=True, minimum=1),
        max_batch=c.number(raw, "max_batch", "[api]", d.max_batch, whole=True, minimum=1),
        max_batch_body=c.number(raw, "max_batch_body", "[api]", d.max_batch_body, whole=True, minimum=1),
        rate_limit=c.number(raw, "rate_limit", "[api]", d.rate_limit),
        rate_burst=c.number(raw, "rate_burst", "[api]", d.rate_burst, whole=True, minimum=1),
    )
    if api.token is not None:
        weakness = _weak_token(api.token.reveal())
        if weakness:
            given = next((k for k in ("token", "token_env", "token_file") if k in raw), "token")
            c.fail(f"[api] {given}", f"the bearer token is too weak: {weakness}")
    if not _is_loopback(api.host) and api.token is None and not any(k.startswith("token") for k in raw):
        c.fail("[api] host", f"{api.host!r} is not a loopback address: set token_env or token_file "
                             "(a bearer token is required to bind elsewhere)")

    raw = c.table(data, "outbox")
    c.keys(raw, "[outbox]", {"path", "max_messages", "ttl", "synchronous", "delivered_retention", "delivered_max",
                             "dead_letter_retention", "dead_letter_max"})
    o = OutboxConfig()
    opath = c.string(raw, "path", "[outbox]", "")
    outbox = OutboxConfig(
        path=str(c.path(opath)) if opath else "",
        max_messages=c.number(raw, "max_messages", "[outbox]", o.max_messages, whole=True, minimum=1),
        ttl=c.number(raw, "ttl", "[outbox]", o.ttl),
        synchronous=c.string(raw, "synchronous", "[outbox]", o.synchronous, ("NORMAL", "FULL")),
        delivered_retention=c.number(raw, "delivered_retention", "[outbox]", o.delivered_retention),
        delivered_max=c.number(raw, "delivered_max", "[outbox]", o.delivered_max, whole=True),
        dead_letter_retention=c.number(raw, "dead_letter_retention", "[outbox]", o.dead_letter_retention),
        dead_letter_max=c.number(raw, "dead_letter_max", "[outbox]", o.dead_letter_max, whole=True),
    )

    raw = c.table(data, "delivery")
    c.keys(raw, "[delivery]", {"max_inflight", "shutdown_deadline", "c2d_poll_interval", "c2d_max_held",
                            "twin_poll_interval", "claim_ahead", "claim_budget"})
    dl = DeliveryConfig()
    delivery = DeliveryConfig(
        max_inflight=c.number(raw, "max_inflight", "[delivery]", dl.max_inflight, whole=True, minimum=1,
                              maximum=1000),
        shutdown_deadline=c.number(raw, "shutdown_deadline", "[delivery]", dl.shutdown_deadline, maximum=3600),
        c2d_poll_interval=c.number(raw, "c2d_poll_interval", "[delivery]", dl.c2d_poll_interval, minimum=0.01,
                                   maximum=3600),
        c2d_max_held=c.number(raw, "c2d_max_held", "[delivery]", dl.c2d_max_held, whole=True, minimum=1,
                              maximum=10000),
        twin_poll_interval=c.number(raw, "twin_poll_interval", "[delivery]", dl.twin_poll_interval, minimum=0.01,
                                    maximum=86400),
        claim_ahead=c.number(raw, "claim_ahead", "[delivery]", dl.claim_ahead, whole=True, minimum=0,
                             maximum=100_000),
        claim_budget=c.number(raw, "claim_budget", "[delivery]", dl.claim_budget, whole=True, minimum=0,
                              maximum=10_000_000),
    )

    raw = c.table(data, "logging")
    c.keys(raw, "[logging]", {"format", "level", "error_interval"})
    lg = LoggingConfig()
    logging_cfg = LoggingConfig(
        format=c.string(raw, "format", "[logging]", lg.format, ("text", "json")),
        level=c.string(raw, "level", "[logging]", lg.level, ("DEBUG", "INFO", "WARNING", "ERROR", "debug",
                                                               "info", "warning", "error")).upper(),
        error_interval=c.number(raw, "error_interval", "[logging]", lg.error_interval),
    )

    raw = c.table(data, "amqp")
    c.keys(raw, "[amqp]", {"multiplex", "devices_per_connection"})
    am = AmqpConfig()
    amqp = AmqpConfig(
        multiplex=c.boolean(raw, "multiplex", "[amqp]", am.multiplex),
        devices_per_connection=c.number(raw, "devices_per_connection", "[amqp]", am.devices_per_connection,
                                        whole=True, minimum=1, maximum=AMQP_DEVICES_PER_CONNECTION),
    )

    raw = c.table(data, "metrics")
    c.keys(raw, "[metrics]", {"per_device_max"})
    metrics = MetricsConfig(
        per_device_max=c.number(raw, "per_device_max", "[metrics]", MetricsConfig().per_device_max, whole=True,
                                maximum=MAX_DEVICES),
    )

    upstream = _upstream(c, c.table(data, "upstream"))
    policy = _policy(c, data.get("policy"))
    devices, registry = _devices(c, data.get("devices"), upstream)

    if c.problems:
        raise ConfigError(c.problems)
    return SidecarConfig(api=api, outbox=outbox, delivery=delivery, logging=logging_cfg, upstream=upstream,
                         policy=policy, devices=devices, source=source, amqp=amqp, metrics=metrics,
                         registry=registry)


def _upstream(c: _Check, raw: dict[str, Any]) -> UpstreamConfig:
    c.keys(raw, "[upstream]", {"kind", "host_name", "host", "tls", "ca_file", "ports"})
    d = UpstreamConfig()
    kind = c.string(raw, "kind", "[upstream]", d.kind, ("emulator", "iothub"))
    host = c.string(raw, "host", "[upstream]", None)
    tls = c.boolean(raw, "tls", "[upstream]", True)
    ca = c.string(raw, "ca_file", "[upstream]", None)
    ports: dict[str, int] = {}
    raw_ports = raw.get("ports", {})
    if not isinstance(raw_ports, Mapping):
        c.fail("[upstream] ports", "expected a table such as { mqtt = 8883 }")
    else:
        c.keys(raw_ports, "[upstream.ports]", set(PROTOCOLS))
        for name in PROTOCOLS:
            if name in raw_ports:
                ports[name] = c.number(raw_ports, name, "[upstream.ports]", 0, whole=True, maximum=65535)
    if kind == "emulator":
        for key in ("host", "tls", "ca_file"):
            if key in raw:
                c.fail(f"[upstream] {key}", "only for kind = \"iothub\" (the emulator runs in-process on loopback)")
    else:
        if "host_name" in raw:
            c.fail("[upstream] host_name", "only for kind = \"emulator\" (a real hub's name is in the connection "
                                           "strings)")
        if not tls and (host is None or not _is_loopback(host)):
            c.fail("[upstream] tls", "false is allowed only with a loopback host (a local emulator); real "
                                     "upstreams always use TLS with verification")
        if ca is not None and not c.path(ca).is_file():
            c.fail("[upstream] ca_file", f"no such file: {c.path(ca)}")
        for name in PROTOCOLS:
            ports.setdefault(name, _IOTHUB_PORTS[name])
        for name, port in ports.items():
            if port == 0:
                c.fail(f"[upstream.ports] {name}", "0 (any port) only makes sense for the emulator")
    return UpstreamConfig(kind=kind, host_name=c.string(raw, "host_name", "[upstream]", d.host_name), host=host,
                          tls=tls, ca_file=str(c.path(ca)) if ca else None, ports=ports)


def _policy(c: _Check, raw: object) -> Policy:
    if raw is None:
        return Policy()
    if not isinstance(raw, Mapping):
        c.fail("[policy]", "expected a table")
        return Policy()
    inline = {k: v for k, v in raw.items() if k != "file"}
    if "file" in raw:
        if inline:
            c.fail("[policy]", "give either file = \"...\" or inline sections, not both")
            return Policy()
        name = raw["file"]
        if not isinstance(name, str):
            c.fail("[policy] file", f"expected a path, got {_show(name)}")
            return Policy()
        try:
            return load_policy(c.path(name))
        except FileNotFoundError:
            c.fail("[policy] file", f"no such file: {c.path(name)}")
        except PolicyConfigError as exc:
            c.problems.append(f"{c.source}: [policy] file: {exc}")
        return Policy()
    try:
        return Policy(PolicyConfig.from_mapping(inline, source="[policy]"))
    except PolicyConfigError as exc:
        c.problems.append(f"{c.source}: {exc}")
    return Policy()


def _devices(c: _Check, raw: object, upstream: UpstreamConfig) -> tuple[tuple[DeviceConfig, ...], str | None]:
    """The devices and the emulator registry file they came from (if any)."""
    if raw is None:
        if upstream.kind == "iothub":
            c.fail("[[devices]]", "no devices: a real hub needs at least one [[devices]] entry or a [devices] "
                                  "file, dir or registry")
        return _DEMO_DEVICES, None
    seen: set[str] = set()
    out: list[DeviceConfig] = []
    if isinstance(raw, Mapping):
        return _device_sources(c, raw, upstream, seen, out)
    if not isinstance(raw, list) or not raw:
        c.fail("[[devices]]", "expected one or more [[devices]] tables, or a [devices] table with file, dir "
                              "or registry")
        return (), None
    for index, entry in enumerate(raw):
        _device(c, entry, f"devices[{index}]", upstream, seen, out)
    return tuple(out), None


def _device(c: _Check, entry: object, where: str, upstream: UpstreamConfig, seen: set[str],
            out: list[DeviceConfig], *, default_protocol: str | None = None) -> None:
    """Validate one device entry (a ``[[devices]]`` table or one from a devices file) into ``out``."""
    if not isinstance(entry, Mapping):
        c.fail(where, f"expected a table (a JSON object), got {_show(entry)}")
        return
    if len(out) >= MAX_DEVICES:
        if not c.too_many:
            c.too_many = True
            c.fail(where, f"more than {MAX_DEVICES} devices: one sidecar serves at most {MAX_DEVICES}")
        return
    c.keys(entry, where, set(_DEVICE_KEYS))
    device_id = entry.get("id")
    if not isinstance(device_id, str) or not _DEVICE_ID.fullmatch(device_id):
        c.fail(f"{where} id", f"expected an IoT Hub device id (1-128 of A-Z a-z 0-9 -:.+%_#*?!(),=@$'), "
                              f"got {_show(device_id)}")
        return
    where = f"{where} ({device_id})"
    if device_id in seen:
        c.fail(f"{where} id", "configured twice")
        return
    seen.add(device_id)
    protocol = entry.get("protocol", default_protocol)
    if protocol not in PROTOCOLS:
        c.fail(f"{where} protocol", f"expected one of {', '.join(PROTOCOLS)}, got {_show(protocol)}")
        return
    mqtt_version = entry.get("mqtt_version", 4)
    if "mqtt_version" in entry and protocol != "mqtt":
        c.fail(f"{where} mqtt_version", "only for protocol = \"mqtt\"")
    elif type(mqtt_version) is not int or mqtt_version not in (4, 5):
        c.fail(f"{where} mqtt_version", f"expected 4 (MQTT 3.1.1) or 5, got {_show(mqtt_version)}")
        mqtt_version = 4
    multiplex: bool | None = None
    if "multiplex" in entry:
        if protocol != "amqp":
            c.fail(f"{where} multiplex", "only for protocol = \"amqp\"")
        else:
            multiplex = c.boolean(entry, "multiplex", where, True)
    secret: Secret | None = None
    if upstream.kind == "emulator":
        for key in ("connection_string", "connection_string_env", "connection_string_file"):
            if key in entry:
                c.fail(f"{where} {key}", "not used with the emulator upstream (it issues the credentials)")
    else:
        secret = c.secret(entry, "connection_string", where, required=True)
        if secret is not None:
            try:
                cs = ConnectionString.parse(secret.reveal())
            except ValueError as exc:
                text = str(exc)
                if secret.reveal() in text or any(part and part in text for part in secret.reveal().split(";")):
                    text = "not a connection string (HostName=...;DeviceId=...;SharedAccessKey=...)"
                c.fail(f"{where} connection string", text)
            else:
                if cs.shared_access_key is None:
                    c.fail(f"{where} connection string", "has no SharedAccessKey")
                if cs.device_id != device_id:
                    c.fail(f"{where} connection string", f"is for device {cs.device_id!r}, not {device_id!r}")
    out.append(DeviceConfig(device_id, str(protocol), secret, mqtt_version, multiplex))


def _device_sources(c: _Check, raw: Mapping[str, Any], upstream: UpstreamConfig, seen: set[str],
                    out: list[DeviceConfig]) -> tuple[tuple[DeviceConfig, ...], str | None]:
    """``[devices]``: ``file`` (JSON Lines), ``dir`` (a file per device), ``registry`` (the emulator's),
    ``protocol`` (for entries that name none). Problems in the files are capped at ``_MAX_PROBLEMS``."""
    c.keys(raw, "[devices]", {"file", "dir", "registry", "protocol"})
    default = c.string(raw, "protocol", "[devices]", None, PROTOCOLS)
    sources = [k for k in ("file", "dir", "registry") if k in raw]
    if not sources:
        c.fail("[devices]", "give file = \"devices.jsonl\", dir = \"devices.d\" or registry = \"registry.json\" "
                            "(or list [[devices]] tables instead)")
        return (), None
    before = len(c.problems)
    registry: str | None = None
    for key in sources:
        name = raw[key]
        if not isinstance(name, str) or not name.strip():
            c.fail(f"[devices] {key}", f"expected a path, got {_show(name)}")
            continue
        path = c.path(name)
        if key == "file":
            _jsonl(c, path, upstream, seen, out, default)
        elif key == "dir":
            _device_dir(c, path, upstream, seen, out, default)
        else:
            if upstream.kind != "emulator":
                c.fail("[devices] registry", "only with kind = \"emulator\" (the bundled emulator loads it; a real "
                                             "hub's devices need connection strings: use file or dir)")
                continue
            _registry(c, path, upstream, seen, out, default)
            registry = str(path)
    extra = len(c.problems) - before - _MAX_PROBLEMS
    if extra > 0:
        del c.problems[before + _MAX_PROBLEMS:]
        c.problems.append(f"{c.source}: [devices]: ... and {extra} more problem(s) in the device files")
    if not out and len(c.problems) == before:
        c.fail("[devices]", "the device files list no devices")
    return tuple(out), registry


@contextlib.contextmanager
def _relative_to(c: _Check, base: Path) -> Iterator[None]:
    """Secret files named in a device file are relative to that file's directory."""
    saved, c.base = c.base, base
    try:
        yield
    finally:
        c.base = saved


def _read_bounded(c: _Check, path: Path, where: str, limit: int) -> bytes | None:
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        c.fail(where, f"cannot read {path}: {exc.strerror or exc}")
        return None
    if len(data) > limit:
        c.fail(where, f"{path} is larger than {limit} bytes")
        return None
    return data


def _jsonl(c: _Check, path: Path, upstream: UpstreamConfig, seen: set[str], out: list[DeviceConfig],
           default: str | None) -> None:
    """One JSON object per line; blank lines and lines starting with ``#`` are skipped."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        c.fail("[devices] file", f"cannot read {path}: {exc.strerror or exc}")
        return
    with fh, _relative_to(c, path.parent):
        lineno = 0
        while True:
            line = fh.readline(_MAX_LINE + 1)
            if not line:
                break
            lineno += 1
            where = f"{path.name}:{lineno}"
            if len(line) > _MAX_LINE and not line.endswith(b"\n"):
                c.fail(where, f"line longer than {_MAX_LINE} bytes")
                while line and not line.endswith(b"\n"):  # skip the rest of it, bounded per read
                    line = fh.readline(_MAX_LINE + 1)
                continue
            text = line.strip()
            if not text or text.startswith(b"#"):
                continue
            entry = _json_entry(c, text, where)
            if entry is not None:
                _device(c, entry, where, upstream, seen, out, default_protocol=default)
            if c.too_many:
                return


def _json_entry(c: _Check, text: bytes, where: str) -> object | None:
    try:
        entry: object = json.loads(text)
        return entry
    except UnicodeDecodeError:
        c.fail(where, "not UTF-8 text")
    except RecursionError:
        c.fail(where, "not valid JSON: nested too deeply")
    except ValueError as exc:  # JSONDecodeError, or an integer past Python's digit limit
        c.fail(where, f"not valid JSON: {str(exc)[:120]}")
    return None


def _device_dir(c: _Check, path: Path, upstream: UpstreamConfig, seen: set[str], out: list[DeviceConfig],
                default: str | None) -> None:
    """``*.json`` and ``*.toml`` (one device each) and ``*.jsonl`` (many), by name; others are ignored."""
    try:
        names = sorted(p for p in path.iterdir() if not p.name.startswith(".")
                       and p.suffix in (".json", ".toml", ".jsonl") and p.is_file())
    except OSError as exc:
        c.fail("[devices] dir", f"cannot list {path}: {exc.strerror or exc}")
        return
    for file in names:
        if c.too_many:
            return
        if file.suffix == ".jsonl":
            _jsonl(c, file, upstream, seen, out, default)
            continue
        data = _read_bounded(c, file, file.name, _MAX_LINE)
        if data is None:
            continue
        entry: object | None
        if file.suffix == ".json":
            entry = _json_entry(c, data, file.name)
        else:
            try:
                entry = tomllib.loads(data.decode("utf-8"))
            except UnicodeDecodeError:
                c.fail(file.name, "not UTF-8 text")
                continue
            except tomllib.TOMLDecodeError as exc:
                c.fail(file.name, f"not valid TOML: {exc}")
                continue
            except (ValueError, RecursionError) as exc:  # an int past the digit limit; nesting
                c.fail(file.name, f"not usable TOML: {str(exc)[:120]}")
                continue
        if entry is not None:
            with _relative_to(c, file.parent):
                _device(c, entry, file.name, upstream, seen, out, default_protocol=default)


def _registry(c: _Check, path: Path, upstream: UpstreamConfig, seen: set[str], out: list[DeviceConfig],
              default: str | None) -> None:
    """The emulator's registry (``iothub-gateway emulator --registry``): its device ids, ``protocol`` from
    ``[devices] protocol`` (amqp when unset: it multiplexes)."""
    data = _read_bounded(c, path, "[devices] registry", 64 * 1024 * 1024)
    if data is None:
        return
    devices = None
    with contextlib.suppress(ValueError, RecursionError, AttributeError):
        devices = json.loads(data).get("devices")
    if not isinstance(devices, Mapping):
        c.fail("[devices] registry", f"{path} is not an emulator registry (a JSON object with a devices table)")
        return
    for device_id in devices:
        _device(c, {"id": device_id}, f"{path.name} device", upstream, seen, out,
                default_protocol=default or "amqp")
        if c.too_many:
            return
