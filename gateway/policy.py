"""Pure decisions: what to do about an ``IoTHubError``, given what happened before on this connection.

``Policy.step(error, history, now=, rand=, op=)`` returns a :data:`Decision` and the next
:class:`History`. It reads no clock, draws no randomness of its own and performs no I/O, so every rule
below is a table test away. The handler (``gateway.handler``) is the only thing that acts on decisions.

The decision follows the error's catalog action (``err.action``), overridable per code from
``configs/policy.toml``; no number in here is a code. Rules, by action:

======================  ==================================================================================
RETRY                   operation: retry on the same connection, capped exponential backoff with full jitter;
                        connection: reconnect on the reconnect curve
THROTTLE                the peer's ``retry_after`` (capped), else the slower throttle curve; resets on success
RECONNECT               reconnect on the reconnect curve; an operation caught in the drop may have been
                        delivered, so it is resent with the same id and flagged as a possible duplicate
REFRESH_CREDENTIALS     call the refresh hook, then reconnect; refused again right after a refresh: stop
WAIT_FOR_DEVICE         hold the operation for its device until the device is online, or its deadline
WAIT_FOR_QUOTA_RESET    park until the next 00:00 UTC plus jitter, or one probe interval, whichever is first
STOP_IDENTITY_CONFLICT  long jittered reconnect; after K takeovers within W seconds, stop naming the identity
                        (only when the hub said the code; an inferred one parks instead, see below)
STOP                    stop the connection (an operation aimed at another device is dead-lettered instead)
FAIL                    dead-letter the operation; a connect refused with it: stop (retrying cannot
                        help); a live connection closed over it: reconnect (the request was the fault)
======================  ==================================================================================

Time: ``now`` is the handler's monotonic clock, and every delay, deadline and ``until`` in a decision is on
it. ``wall`` (epoch seconds, default ``now``) is read only to aim at 00:00 UTC (quota) and at a peer's
absolute ``retry_at`` (HTTP-date ``Retry-After``); each is turned into a monotonic target at once.

What the handler does on MQTT 3.1.1 drops, and why
--------------------------------------------------

MQTT 3.1.1 has no way to say "no" to a publish: IoT Hub refuses a message (throttled, malformed, refused)
by closing the socket, and closes it the same way when another client connects with our identity. The
transport says so (``ambiguous_drops = True``), and the handler tells :meth:`Policy.step` which telemetry
messages were in flight when such a drop (without an exact code) happened. The evidence is read like this:

- **Sends in flight: the drop is about them, not about our identity.** Each in-flight message's drop count
  goes up, and the next connections run in *suspect* mode: one send at a time, messages with fewer drops
  first (then in arrival order), so each later drop names exactly one message. Suspect mode ends after
  ``drops.suspect_successes`` deliveries.
- **Poison**: a message that was alone in flight at ``drops.poison_after`` drops, while other messages were
  delivered between its drops, is refused for what it is. It is dead-lettered with an inferred (not exact)
  code (:func:`poison_code`: MessageTooLarge above 256 KiB, else ArgumentInvalid), and the messages
  behind it flow. Because other messages flow, the hub is not throttling and the identity is ours: the
  message itself is the fault.
- **Nothing flows**: when every send drops (no delivery between two drops), the hub is refusing
  everything: that is throttling on a protocol that cannot say so. The handler reconnects on the throttle
  curve, reports THROTTLED (and counts it as throttled), never dead-letters and never stops.
- **Nothing in flight**: the drop may be a takeover by another client with our identity (or the network).
  ``drops.takeover_repeat`` such drops within ``identity.window`` park the connection for
  ``drops.takeover_park`` seconds (state PARKED, a metric and a warning in the log: an operator should
  look), then it tries again. Ambiguous evidence never stops a device for good; only an exact
  ConnectionForcefullyClosedOnNewConnection or LinkCreationConflict (MQTT 5, AMQP: the hub said it) may
  end in ``Stop(identity_conflict)`` after K takeovers in the window.

The earlier rule (quick drops after a connect are a takeover) stopped devices whose only fault was a
throttled or refused publish that was resent after each reconnect, so it is gone.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import random
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeAlias

from gateway.codes import Action, by_name, code_of, lookup, parse_code
from gateway.errors import IoTHubError, OperationTimeoutError

__all__ = [
    "MAX_D2C_MESSAGE",
    "Backoff",
    "CodeOverride",
    "DeadLetter",
    "Decision",
    "DropConfig",
    "DropRecord",
    "History",
    "HoldForDevice",
    "IdentityBackoff",
    "Operation",
    "ParkUntil",
    "Policy",
    "PolicyConfig",
    "PolicyConfigError",
    "ReconnectAfter",
    "ReconnectBackoff",
    "RefreshCredentials",
    "RetryAfter",
    "Stop",
    "StopReason",
    "ThrottleBackoff",
    "load_policy",
    "next_utc_midnight",
    "poison_code",
]

_NOT_CONNECTED = code_of("NotConnected")
_OPERATION_TIMED_OUT = code_of("OperationTimedOut")
_DAY = 86_400.0

# --------------------------------------------------------------------------------------------------
# Configuration


class PolicyConfigError(ValueError):
    """``configs/policy.toml`` (or a mapping) names an unknown section, key or code, or a bad value."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """A capped exponential curve: attempt n waits ``min(cap, initial * multiplier**(n-1))``, jittered.

    ``jitter`` is the random fraction of that step: 1.0 is full jitter (uniform in [0, step]), 0.5 is
    "equal jitter" (uniform in [step/2, step]), 0 is none. ``max_attempts`` and ``max_elapsed`` bound a
    retry episode (0 means no limit).
    """

    initial: float = 0.5
    multiplier: float = 2.0
    cap: float = 30.0
    jitter: float = 1.0
    max_attempts: int = 10
    max_elapsed: float = 240.0

    def step_for(self, attempt: int) -> float:
        """The un-jittered delay of attempt ``attempt`` (1-based)."""
        exponent = max(0, attempt - 1)
        try:
            raw = self.initial * self.multiplier**exponent
        except OverflowError:
            return self.cap
        return min(self.cap, raw)

    def delay(self, attempt: int, u: float) -> float:
        """The jittered delay for ``attempt`` given a uniform draw ``u`` in [0, 1)."""
        step = self.step_for(attempt)
        return max(0.0, min(self.cap, step * (1.0 - self.jitter + self.jitter * u)))

    def exhausted(self, attempt: int, elapsed: float) -> bool:
        """True when ``attempt`` (the one that just failed) or ``elapsed`` reached a limit."""
        return (self.max_attempts > 0 and attempt >= self.max_attempts) or (
            self.max_elapsed > 0 and elapsed >= self.max_elapsed
        )


_INEXACT_REFUSALS: Final = 3


@dataclass(frozen=True, slots=True)
class ReconnectBackoff(Backoff):
    """The reconnect curve, plus how often a connect refused with an inferred permanent code is retried.

    A generic condition (a proxy's bare 404, AMQP ``invalid-field`` from a framing fault) is not the hub's
    word that this device can never connect, and on a multiplexed connection one such refusal reaches a
    thousand devices: they try again on this curve and stop only at the ``inexact_refusals``-th refusal in
    a row. An exact code (the hub's own) stops at once.
    """

    initial: float = 1.0
    multiplier: float = 2.0
    cap: float = 60.0
    jitter: float = 1.0
    max_attempts: int = 0
    max_elapsed: float = 0.0
    inexact_refusals: int = _INEXACT_REFUSALS


@dataclass(frozen=True, slots=True)
class ThrottleBackoff(Backoff):
    """The throttle curve, plus the cap on a peer-given delay (``Retry-After`` and the like)."""

    initial: float = 10.0
    multiplier: float = 2.0
    cap: float = 120.0
    jitter: float = 0.5
    max_attempts: int = 0
    max_elapsed: float = 0.0
    max_retry_after: float = 600.0


@dataclass(frozen=True, slots=True)
class IdentityBackoff(Backoff):
    """The identity-conflict curve and the takeover limit (only an exact code may stop)."""

    initial: float = 30.0
    multiplier: float = 2.0
    cap: float = 300.0
    jitter: float = 0.5
    max_attempts: int = 0
    max_elapsed: float = 0.0
    max_takeovers: int = 3  #: K: stop at the K-th takeover within the window
    window: float = 900.0  #: W, seconds (also the window of inferred takeovers)
    refresh_grace: float = 5.0  #: a refreshed credential dropped within this many seconds did not work


@dataclass(frozen=True, slots=True)
class DropConfig:
    """Reading connection drops on a transport that refuses by closing the socket (MQTT 3.1.1)."""

    poison_after: int = 3  #: N: alone in flight at N drops, while others flowed -> dead-letter it
    suspect_successes: int = 10  #: deliveries after which sends go concurrently again
    takeover_repeat: int = 3  #: drops with nothing in flight within identity.window before parking
    takeover_park: float = 1800.0  #: how long to park after them before trying again
    max_tracked: int = 1000  #: message ids whose drops are remembered (oldest forgotten first)


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """Where to park after the daily quota is used up."""

    probe_interval: float = 3600.0  #: try one send again after this long, even before the reset
    reset_jitter: float = 300.0  #: spread over this many seconds after 00:00 UTC


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Holding work for a device that is offline."""

    hold_timeout: float = 300.0  #: an item held longer than this (or past its own deadline) expires
    max_held: int = 1000  #: per device; beyond it a new item is refused with the offline code


@dataclass(frozen=True, slots=True)
class OperationConfig:
    """Deadlines the handler applies when the caller gives none."""

    timeout: float = 240.0  #: a whole operation, retries included
    connect_timeout: float = 30.0  #: one connect attempt
    refresh_timeout: float = 30.0  #: one call of the credential-refresh hook
    renew_before: float = 300.0  #: renew a token this long before it expires, at a quiet moment
    renew_margin: float = 60.0  #: ... but no later than this long before it expires, quiet or not
    timeouts_to_drop: int = 3  #: OperationTimedOut in a row on one connection: it is half-open, reconnect


@dataclass(frozen=True, slots=True)
class CodeOverride:
    """Per-code settings: another action and/or other curve parameters."""

    action: Action | None = None
    params: Mapping[str, float | int] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Everything the policy reads. The defaults are the shipped ``configs/policy.toml``."""

    retry: Backoff = Backoff()
    reconnect: ReconnectBackoff = ReconnectBackoff()
    throttle: ThrottleBackoff = ThrottleBackoff()
    identity: IdentityBackoff = IdentityBackoff()
    quota: QuotaConfig = QuotaConfig()
    device: DeviceConfig = DeviceConfig()
    operation: OperationConfig = OperationConfig()
    drops: DropConfig = DropConfig()
    codes: Mapping[int, CodeOverride] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "policy") -> PolicyConfig:
        """Build a config from parsed TOML; every problem is a ``PolicyConfigError`` naming its path."""
        if not isinstance(data, Mapping):
            raise PolicyConfigError(f"{source}: expected a table at the top level")
        sections: dict[str, Any] = {}
        for key, value in data.items():
            if key == "codes":
                continue
            proto = _SECTIONS.get(key)
            if proto is None:
                raise PolicyConfigError(
                    f"{source}: unknown section [{key}] (known: {', '.join(sorted([*_SECTIONS, 'codes']))})"
                )
            sections[key] = _build_section(proto, value, f"{source}: [{key}]")
        codes = _build_codes(data.get("codes", {}), source)
        config = cls(**sections, codes=MappingProxyType(codes))
        for code, override in codes.items():  # the overridden curve must still be a valid curve
            curve = _curve_for_action(config, override.action or lookup(code).action)
            try:
                _check_curve(dataclasses.replace(curve, **dict[str, Any](override.params)))
            except PolicyConfigError as exc:
                raise PolicyConfigError(f"{source}: [codes.{code}] {exc}") from None
        return config


def load_policy(path: str | Path) -> Policy:
    """Read a policy file (TOML). Raises ``PolicyConfigError`` with the file and key on any problem."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyConfigError(f"{p}: not valid TOML: {exc}") from exc
    return Policy(PolicyConfig.from_mapping(data, source=str(p)))


_SECTIONS: dict[str, object] = {
    "retry": Backoff(),
    "reconnect": PolicyConfig().reconnect,
    "throttle": ThrottleBackoff(),
    "identity": IdentityBackoff(),
    "quota": QuotaConfig(),
    "device": DeviceConfig(),
    "operation": OperationConfig(),
    "drops": DropConfig(),
}
_REMOVED = {  # keys of earlier releases whose rule is gone, with what replaces it
    name: "the quick-drop rule stopped MQTT 3.1.1 devices over refused publishes; drops are now read as the "
          "[drops] section describes (inferred takeovers park, never stop)"
    for name in ("quick_drop", "quick_drop_repeat", "quick_drop_transports")
}
_CURVE_KEYS = frozenset(f.name for f in dataclasses.fields(Backoff))
_INT_KEYS = frozenset({"max_attempts", "max_takeovers", "max_held", "poison_after", "suspect_successes",
                       "takeover_repeat", "max_tracked", "timeouts_to_drop", "inexact_refusals"})
_AT_LEAST_ONE = frozenset({"multiplier", "inexact_refusals", "max_takeovers", "max_held", "poison_after",
                           "takeover_repeat", "max_tracked", "timeouts_to_drop"})


def _build_section(proto: object, value: object, where: str) -> object:
    if not isinstance(value, Mapping):
        raise PolicyConfigError(f"{where}: expected a table")
    names = {f.name for f in dataclasses.fields(proto)}  # type: ignore[arg-type]
    params: dict[str, Any] = {}
    for key, raw in value.items():
        if key in _REMOVED:
            raise PolicyConfigError(f"{where}: {key!r} was removed: {_REMOVED[key]}")
        if key not in names:
            raise PolicyConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(names))})")
        params[key] = _check_value(key, raw, f"{where} {key}")
    built = dataclasses.replace(proto, **params)  # type: ignore[type-var]
    if isinstance(built, Backoff):
        try:
            _check_curve(built)
        except PolicyConfigError as exc:
            raise PolicyConfigError(f"{where}: {exc}") from None
    return built


def _check_value(key: str, raw: object, where: str) -> object:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise PolicyConfigError(f"{where}: expected a number, got {raw!r}")
    if key in _INT_KEYS and not isinstance(raw, int):
        raise PolicyConfigError(f"{where}: expected a whole number, got {raw!r}")
    if not math.isfinite(raw) or raw < 0:
        raise PolicyConfigError(f"{where}: expected a finite number >= 0, got {raw!r}")
    if key in _AT_LEAST_ONE and raw < 1:
        raise PolicyConfigError(f"{where}: must be >= 1, got {raw!r}")
    if key == "jitter" and raw > 1:
        raise PolicyConfigError(f"{where}: must be within [0, 1], got {raw!r}")
    return raw if key in _INT_KEYS else float(raw)


def _check_curve(curve: Backoff) -> None:
    if curve.cap < curve.initial:
        raise PolicyConfigError(f"cap ({curve.cap}) must be >= initial ({curve.initial})")
    if curve.multiplier < 1:
        raise PolicyConfigError(f"multiplier must be >= 1, got {curve.multiplier}")
    if not 0 <= curve.jitter <= 1:
        raise PolicyConfigError(f"jitter must be within [0, 1], got {curve.jitter}")


def _build_codes(value: object, source: str) -> dict[int, CodeOverride]:
    if not isinstance(value, Mapping):
        raise PolicyConfigError(f"{source}: [codes] must be a table of code tables")
    out: dict[int, CodeOverride] = {}
    for key, body in value.items():
        where = f"{source}: [codes.{key}]"
        code = _resolve_code(str(key), where)
        if code in out:
            raise PolicyConfigError(f"{where}: code {code} is configured twice")
        if not isinstance(body, Mapping):
            raise PolicyConfigError(f"{where}: expected a table")
        action: Action | None = None
        params: dict[str, float | int] = {}
        for k, raw in body.items():
            if k == "action":
                try:
                    action = Action(raw)
                except ValueError:
                    raise PolicyConfigError(
                        f"{where} action: unknown action {raw!r} (known: {', '.join(a.value for a in Action)})"
                    ) from None
            elif k in _CURVE_KEYS:
                checked = _check_value(k, raw, f"{where} {k}")
                assert isinstance(checked, (int, float))
                params[k] = checked
            else:
                known = ", ".join(sorted([*_CURVE_KEYS, "action"]))
                raise PolicyConfigError(f"{where}: unknown key {k!r} (known: {known})")
        out[code] = CodeOverride(action=action, params=MappingProxyType(params))
    return out


def _resolve_code(key: str, where: str) -> int:
    text = key.strip()
    if text.isdigit():
        try:
            number = parse_code(text)
        except ValueError as exc:
            raise PolicyConfigError(f"{where}: {exc}") from None
        info = lookup(number)
        if not info.known:
            raise PolicyConfigError(f"{where}: unknown code {number} (not in the catalog)")
        return info.code
    row = by_name(text)
    if row is None:
        raise PolicyConfigError(f"{where}: unknown code name {key!r}")
    return row.code


def _curve_for_action(config: PolicyConfig, action: Action) -> Backoff:
    if action is Action.THROTTLE:
        return config.throttle
    if action is Action.STOP_IDENTITY_CONFLICT:
        return config.identity
    if action is Action.RECONNECT:
        return config.reconnect
    return config.retry


# --------------------------------------------------------------------------------------------------
# Decisions


class StopReason(enum.StrEnum):
    """Why a connection stopped for good (until someone changes something)."""

    UNAUTHORIZED = "unauthorized"  #: the credential was refused, even after a refresh
    REFUSED = "refused"  #: a permanent refusal: device disabled or unknown, hub suspended, bad tier ...
    IDENTITY_CONFLICT = "identity_conflict"  #: another client keeps taking this identity
    RETRY_EXPIRED = "retry_expired"  #: the configured reconnect limits ran out


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """Retry the operation on the current connection after ``delay`` seconds."""

    delay: float
    code: int
    attempt: int
    throttled: bool = False
    possible_duplicate: bool = False  #: the failed attempt may have been delivered: resend, same id


@dataclass(frozen=True, slots=True)
class ReconnectAfter:
    """The connection is gone: reconnect after ``delay`` seconds (then resume pending work)."""

    delay: float
    code: int
    attempt: int
    throttled: bool = False
    possible_duplicate: bool = False
    identity_conflict: bool = False
    attributed: bool = False  #: an ambiguous drop was put down to the sends in flight (MQTT 3.1.1)
    poison: tuple[str, ...] = ()  #: message ids to dead-letter as poison (see the module docstring)
    inferred_takeover: bool = False  #: an ambiguous drop with nothing in flight: maybe a takeover


@dataclass(frozen=True, slots=True)
class RefreshCredentials:
    """Call the credential-refresh hook, then reconnect at once."""

    code: int


@dataclass(frozen=True, slots=True)
class HoldForDevice:
    """Hold the operation until ``device_id`` is online or ``deadline`` passes."""

    device_id: str
    deadline: float
    code: int


@dataclass(frozen=True, slots=True)
class ParkUntil:
    """Send nothing until ``until`` (monotonic); the first send after it is the probe.

    ``takeover``: parked because of repeated inferred takeovers (MQTT 3.1.1 drops with nothing in flight),
    not because of the quota: the connection stays down until ``until``, then tries again.
    """

    until: float
    code: int
    takeover: bool = False


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop the connection: reconnecting cannot help until someone changes something."""

    reason: StopReason
    code: int
    detail: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """This operation fails with ``code``; the handler reports it (and hands it to the undelivered hook)."""

    code: int
    detail: str


Decision: TypeAlias = RetryAfter | ReconnectAfter | RefreshCredentials | HoldForDevice | ParkUntil | Stop | DeadLetter


@dataclass(frozen=True, slots=True)
class DropRecord:
    """What the drops say about one message: how often it was in flight, how often alone, and whether
    another message was delivered between two of its drops (then the hub is neither throttling nor
    taking our identity: the message is the fault)."""

    drops: int = 0
    solo: int = 0
    mark: int = 0  #: ``History.delivered`` at its last drop
    flowed: bool = False


@dataclass(frozen=True, slots=True)
class History:
    """What the policy remembers about one connection. Immutable: each step returns a new one."""

    identity: str = ""  #: the device (or device/module) id this connection authenticates as
    can_refresh: bool = False  #: a credential-refresh hook is registered
    attempt: int = 0  #: failed connection attempts in the current outage
    retry_since: float | None = None  #: when the current outage began
    connected_at: float | None = None  #: when the live connection was made (None while down)
    throttle_attempt: int = 0  #: throttle decisions since the last success
    refreshed: bool = False  #: credentials were refreshed and have not yet proven themselves
    takeovers: tuple[float, ...] = ()  #: identity-conflict events within the window
    ambiguous_drops: bool = False  #: the transport refuses by closing the socket (MQTT 3.1.1)
    inferred_takeovers: tuple[float, ...] = ()  #: ambiguous drops with nothing in flight, within the window
    drop_records: Mapping[str, DropRecord] = field(default_factory=lambda: MappingProxyType({}))
    delivered: int = 0  #: sends delivered while drop evidence is being kept (a counter, for "did others flow")
    delivered_at_drop: int | None = None  #: ``delivered`` at the last drop with sends in flight
    suspect: int = 0  #: > 0: suspect mode, one send at a time; deliveries left before it ends
    refusals: int = 0  #: connects refused in a row with an inexact permanent code

    def on_connected(self, now: float) -> History:
        """A connect succeeded: the outage is over."""
        return dataclasses.replace(self, attempt=0, retry_since=None, connected_at=now, refusals=0)

    def on_success(self) -> History:
        """An operation succeeded: throttling is over and a refreshed credential has proven itself."""
        if self.throttle_attempt == 0 and not self.refreshed:
            return self
        return dataclasses.replace(self, throttle_attempt=0, refreshed=False)

    def on_delivered(self, message_id: str) -> History:
        """A send was delivered: it is cleared of drops, and it counts as "others flow" for the rest."""
        if not self.ambiguous_drops or (not self.drop_records and self.suspect == 0 and self.delivered_at_drop is None):
            return self
        records = self.drop_records
        if message_id in records:
            records = MappingProxyType({k: v for k, v in records.items() if k != message_id})
        return dataclasses.replace(self, drop_records=records, delivered=self.delivered + 1,
                                   suspect=max(0, self.suspect - 1))

    def drops_of(self, message_id: str) -> int:
        """How many drops happened while ``message_id`` was in flight (orders sends in suspect mode)."""
        record = self.drop_records.get(message_id)
        return record.drops if record is not None else 0

    def on_closed(self) -> History:
        """We closed the connection ourselves (a refresh reconnect, shutdown): not an outage."""
        return dataclasses.replace(self, connected_at=None)


@dataclass(frozen=True, slots=True)
class Operation:
    """The operation an error belongs to (None for connection-level errors)."""

    attempt: int  #: 1-based number of the attempt that just failed
    started: float  #: when the operation began
    device_id: str | None = None  #: the device the operation is aimed at, if any


def next_utc_midnight(now: float) -> float:
    """The next 00:00 UTC strictly after ``now`` (epoch seconds; POSIX days are 86 400 s)."""
    return (math.floor(now / _DAY) + 1) * _DAY


def _draw(rand: random.Random | float) -> float:
    u = rand.random() if isinstance(rand, random.Random) else float(rand)
    if not 0.0 <= u < 1.0 or math.isnan(u):
        raise ValueError(f"rand must be a random.Random or a float in [0, 1), got {rand!r}")
    return u


# --------------------------------------------------------------------------------------------------
# The policy


class Policy:
    """Decides what to do about an error. Stateless apart from its configuration."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        # a plain Backoff given as the reconnect curve (older callers) keeps the default
        self._inexact_refusals: int = getattr(self.config.reconnect, "inexact_refusals", _INEXACT_REFUSALS)

    @classmethod
    def default(cls) -> Policy:
        return cls(PolicyConfig())

    def action_for(self, err: IoTHubError) -> Action:
        """The action the policy applies to ``err``: a per-code override, else the catalog's."""
        override = self.config.codes.get(err.code)
        if override is not None and override.action is not None:
            return override.action
        return err.action

    def curve(self, action: Action, code: int | None = None) -> Backoff:
        """The backoff curve for ``action``, with the per-code parameter overrides of ``code`` applied."""
        base = _curve_for_action(self.config, action)
        override = self.config.codes.get(code) if code is not None else None
        if override is not None and override.params:
            return dataclasses.replace(base, **dict[str, Any](override.params))
        return base

    def max_delay(self) -> float:
        """The longest delay any retry or reconnect decision can carry (parking excluded)."""
        caps = [self.config.retry.cap, self.config.reconnect.cap, self.config.throttle.cap,
                self.config.throttle.max_retry_after, self.config.identity.cap]
        for code, override in self.config.codes.items():
            caps.append(self.curve(override.action or lookup(code).action, code).cap)
        return max(caps)

    def decide(
        self,
        err: IoTHubError,
        history: History,
        *,
        now: float,
        rand: random.Random | float,
        op: Operation | None = None,
        wall: float | None = None,
        in_flight: tuple[str, ...] = (),
    ) -> Decision:
        """The decision alone (see :meth:`step`)."""
        return self.step(err, history, now=now, rand=rand, op=op, wall=wall, in_flight=in_flight)[0]

    def step(
        self,
        err: IoTHubError,
        history: History,
        *,
        now: float,
        rand: random.Random | float,
        op: Operation | None = None,
        wall: float | None = None,
        in_flight: tuple[str, ...] = (),
    ) -> tuple[Decision, History]:
        """Decide about ``err`` and return the decision with the updated history.

        ``op`` is None when the connection itself failed (a connect attempt, or a drop of the live
        connection); otherwise it describes the operation that failed on a connection that may be fine.
        ``rand`` is either a ``random.Random`` (one draw is taken) or the draw itself, in [0, 1).
        ``now`` is monotonic; ``wall`` (epoch, default ``now``) only aims at wall-clock targets.
        ``in_flight``: the ids of the sends in flight when the live connection dropped (ambiguous drops).
        """
        u = _draw(rand)
        action = self.action_for(err)
        code = err.code
        hist = history
        wall = now if wall is None else wall

        if (op is None and hist.ambiguous_drops and hist.connected_at is not None and not err.exact
                and action is Action.RECONNECT):
            return self._ambiguous_drop(err, hist, now, u, in_flight)

        if action is Action.STOP_IDENTITY_CONFLICT:
            return self._identity(err, hist, now, u, op)
        if action is Action.REFRESH_CREDENTIALS:
            return self._credentials(err, hist, now)
        if action is Action.WAIT_FOR_QUOTA_RESET:
            to_reset = next_utc_midnight(wall) - wall + u * self.config.quota.reset_jitter
            until = now + min(to_reset, self.config.quota.probe_interval)
            return ParkUntil(until=until, code=code), hist
        if action is Action.STOP:
            if op is not None and op.device_id and hist.identity and op.device_id != hist.identity:
                return DeadLetter(code, f"{err.name} for device {op.device_id!r}: {err.message}"), hist
            return Stop(StopReason.REFUSED, code, f"{err.name}: {err.message}"), _down(hist, op)
        if action is Action.FAIL:
            if op is None and hist.connected_at is not None:
                # A live connection closed over one bad request (MQTT 5 DISCONNECT 0x95 for an oversized
                # message, say): that operation fails on its own; the connection is fine to reopen.
                return self._reconnect(err, hist, now, u, Action.RECONNECT)
            if op is None and not err.exact and hist.refusals + 1 < self._inexact_refusals:
                decision, hist = self._reconnect(err, hist, now, u, Action.RECONNECT)
                return decision, dataclasses.replace(hist, refusals=hist.refusals + 1)
            if op is None:
                return Stop(StopReason.REFUSED, code, f"connection refused permanently: {err.name}: {err.message}"), \
                    _down(hist, op)
            return DeadLetter(code, f"{err.name}: {err.message}"), hist
        if op is None:
            return self._reconnect(err, hist, now, u, action, wall)
        return self._operation(err, hist, now, u, action, op=op, wall=wall)

    # -- pieces -----------------------------------------------------------------------------------

    def _throttle_delay(self, err: IoTHubError, hist: History, wall: float, u: float) -> float:
        curve = self.curve(Action.THROTTLE, err.code)
        cap = self.config.throttle.max_retry_after
        hinted = err.retry_after
        if hinted is None and err.retry_at is not None:
            hinted = max(0.0, err.retry_at - wall)  # an absolute (epoch) date: the one use of the wall clock
        if hinted is not None:
            # The peer knows best; a little jitter on top keeps a fleet told "10 s" from returning at once.
            return min(cap, hinted * (1.0 + 0.1 * u))
        return curve.delay(hist.throttle_attempt + 1, u)

    def _reconnect(self, err: IoTHubError, hist: History, now: float, u: float, action: Action,
                   wall: float | None = None) -> tuple[Decision, History]:
        attempt = hist.attempt + 1
        since = hist.retry_since if hist.retry_since is not None else now
        throttled = action is Action.THROTTLE
        limits = self.curve(Action.RECONNECT, err.code)
        if limits.exhausted(attempt, now - since):
            detail = f"gave up reconnecting after {attempt} attempts over {now - since:.0f}s; last: {err.name}"
            return Stop(StopReason.RETRY_EXPIRED, err.code, detail), _down(hist, None)
        delay = self._throttle_delay(err, hist, now if wall is None else wall, u) if throttled \
            else limits.delay(attempt, u)
        nxt = dataclasses.replace(
            hist, attempt=attempt, retry_since=since, connected_at=None,
            throttle_attempt=hist.throttle_attempt + (1 if throttled else 0),
        )
        return ReconnectAfter(delay=delay, code=err.code, attempt=attempt, throttled=throttled), nxt

    def _operation(self, err: IoTHubError, hist: History, now: float, u: float, action: Action, *,
                   op: Operation, wall: float) -> tuple[Decision, History]:
        code = err.code
        if action is Action.WAIT_FOR_DEVICE:
            device = err.device_id or op.device_id
            if device:
                return HoldForDevice(device, now + self.config.device.hold_timeout, code), hist
            action = Action.RETRY  # no device to wait for: an ordinary retry
        if action is Action.RECONNECT:
            # The drop may have come after the hub took the message: resend, same id, flagged.
            duplicate = code != _NOT_CONNECTED
            limits = self.curve(Action.RETRY, code)
            if limits.exhausted(op.attempt, now - op.started):
                return DeadLetter(code, f"gave up after {op.attempt} attempts: {err.name}"), hist
            delay = self.curve(Action.RECONNECT, code).delay(hist.attempt + 1, u)
            return ReconnectAfter(delay, code, op.attempt, possible_duplicate=duplicate), hist
        throttled = action is Action.THROTTLE
        curve = self.curve(action, code)
        if curve.exhausted(op.attempt, now - op.started):
            detail = f"gave up after {op.attempt} attempts over {now - op.started:.0f}s: {err.name}"
            return DeadLetter(code, detail), hist
        if throttled:
            delay = self._throttle_delay(err, hist, wall, u)
            hist = dataclasses.replace(hist, throttle_attempt=hist.throttle_attempt + 1)
        else:
            delay = curve.delay(op.attempt, u)
        duplicate = isinstance(err, OperationTimeoutError) or code == _OPERATION_TIMED_OUT
        return RetryAfter(delay, code, op.attempt, throttled=throttled, possible_duplicate=duplicate), hist

    def _credentials(self, err: IoTHubError, hist: History, now: float) -> tuple[Decision, History]:
        refreshed = hist.refreshed
        if refreshed and hist.connected_at is not None and now - hist.connected_at > self.config.identity.refresh_grace:
            refreshed = False  # the refreshed credential held the connection for a while: it worked
        if not hist.can_refresh:
            return Stop(StopReason.UNAUTHORIZED, err.code,
                        f"{err.name}: credential refused and no refresh hook is registered"), _down(hist, None)
        if refreshed:
            return Stop(StopReason.UNAUTHORIZED, err.code,
                        f"{err.name}: the refreshed credential was refused too"), _down(hist, None)
        return RefreshCredentials(err.code), dataclasses.replace(hist, refreshed=True, connected_at=None)

    def _identity(self, err: IoTHubError, hist: History, now: float, u: float, op: Operation | None) -> tuple[
            Decision, History]:
        idc = self.config.identity
        takeovers = (*[t for t in hist.takeovers if t > now - idc.window], now)
        hist = dataclasses.replace(hist, takeovers=takeovers, connected_at=None)
        who = hist.identity or err.device_id or "(unknown identity)"
        if len(takeovers) >= idc.max_takeovers and not err.exact:
            # Only the hub's own word may stop a device for good; an inferred code parks long and alerts.
            hist = dataclasses.replace(hist, takeovers=())
            return ParkUntil(now + self.config.drops.takeover_park, err.code, takeover=True), hist
        if len(takeovers) >= idc.max_takeovers:
            detail = (f"identity conflict: another client keeps connecting as {who!r} "
                      f"({len(takeovers)} takeovers within {idc.window:.0f}s, last {err.name}); "
                      f"stopping so the other instance keeps the connection")
            return Stop(StopReason.IDENTITY_CONFLICT, err.code, detail), hist
        delay = self.curve(Action.STOP_IDENTITY_CONFLICT, err.code).delay(len(takeovers), u)
        attempt = op.attempt if op is not None else hist.attempt + 1
        if op is None:
            hist = dataclasses.replace(hist, attempt=attempt,
                                       retry_since=hist.retry_since if hist.retry_since is not None else now)
        return ReconnectAfter(delay, err.code, attempt, identity_conflict=True,
                              possible_duplicate=op is not None), hist

    def _ambiguous_drop(self, err: IoTHubError, hist: History, now: float, u: float,
                        in_flight: tuple[str, ...]) -> tuple[Decision, History]:
        """A live connection dropped without an exact code on a transport that refuses by dropping.

        See the module docstring: sends in flight take the blame (poison, or throttling when nothing
        flows); a drop with nothing in flight counts toward an inferred takeover, which parks, never stops.
        """
        dc = self.config.drops
        if not in_flight:
            window_start = now - self.config.identity.window
            takeovers = (*[t for t in hist.inferred_takeovers if t > window_start], now)
            hist = dataclasses.replace(hist, inferred_takeovers=takeovers, connected_at=None)
            if len(takeovers) >= dc.takeover_repeat:
                hist = dataclasses.replace(hist, inferred_takeovers=())
                return ParkUntil(now + dc.takeover_park, err.code, takeover=True), hist
            decision, hist = self._reconnect(err, hist, now, u, Action.RECONNECT)
            if isinstance(decision, ReconnectAfter):
                decision = dataclasses.replace(decision, inferred_takeover=True)
            return decision, hist
        records = dict(hist.drop_records)
        solo = len(in_flight) == 1
        poison: list[str] = []
        for mid in in_flight:
            rec = records.pop(mid, DropRecord())
            flowed = rec.flowed or (rec.drops > 0 and hist.delivered > rec.mark)
            rec = DropRecord(drops=rec.drops + 1, solo=rec.solo + (1 if solo else 0), mark=hist.delivered,
                             flowed=flowed)
            if solo and rec.solo >= dc.poison_after and rec.flowed:
                poison.append(mid)
            else:
                records[mid] = rec  # re-inserted last: the oldest entries are forgotten first
        while len(records) > dc.max_tracked:
            del records[next(iter(records))]
        nothing_flowed = hist.delivered_at_drop is not None and hist.delivered == hist.delivered_at_drop
        hist = dataclasses.replace(hist, drop_records=MappingProxyType(records), delivered_at_drop=hist.delivered,
                                   suspect=max(1, dc.suspect_successes))
        action = Action.THROTTLE if nothing_flowed and not poison else Action.RECONNECT
        decision, hist = self._reconnect(err, hist, now, u, action)
        if isinstance(decision, ReconnectAfter):
            decision = dataclasses.replace(decision, attributed=True, poison=tuple(poison))
        return decision, hist


#: IoT Hub's limit on one device-to-cloud message, body and properties together (256 KiB).
MAX_D2C_MESSAGE = 256 * 1024


def poison_code(size: int | None = None) -> int:
    """The code a poison message is dead-lettered with on an ambiguous-drop transport (``exact=False``).

    The hub refused this one message by closing the socket while others were delivered, so it is neither
    throttling nor a takeover: it is the message. Over IoT Hub's 256 KiB (``size`` counts the body and the
    application properties), the refusal is MessageTooLarge; otherwise it is content the hub will not take
    (a property, topic or body it finds invalid), which its other protocols (MQTT 5, AMQP, HTTP) answer with
    ArgumentInvalid. Both are FAIL codes, never retried; both are inferred, since 3.1.1 never said.
    """
    if size is not None and size > MAX_D2C_MESSAGE:
        return code_of("MessageTooLarge")
    return code_of("ArgumentInvalid")


def _down(hist: History, op: Operation | None) -> History:
    return hist if op is not None else dataclasses.replace(hist, connected_at=None)
