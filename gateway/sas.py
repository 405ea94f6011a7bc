"""Connection strings and SAS tokens: what every transport and the emulator need to agree on.

Pure functions: the expiry time is handed in, never read from a clock here. The token format is IoT
Hub's: ``SharedAccessSignature sr={uri}&sig={sig}&se={expiry}[&skn={policy}]`` where ``sig`` is the
base64 HMAC-SHA256 of ``{url-encoded uri}\\n{expiry}`` under the base64-decoded key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, quote_plus

__all__ = [
    "ConnectionString",
    "SasToken",
    "ServiceCredential",
    "make_sas_token",
    "minted_secrets",
    "minted_version",
    "parse_sas_token",
    "register_secret",
    "verify_sas_token",
]


@dataclass(frozen=True, slots=True)
class ConnectionString:
    """A device connection string: ``HostName=...;DeviceId=...;SharedAccessKey=...``."""

    host_name: str
    device_id: str
    shared_access_key: str | None = None
    module_id: str | None = None
    gateway_host_name: str | None = None

    @classmethod
    def parse(cls, text: str) -> ConnectionString:
        fields = _fields(text)
        missing = [k for k in ("HostName", "DeviceId") if k not in fields]
        if missing:
            raise ValueError(f"connection string lacks {', '.join(missing)}")
        secret = fields.get("SharedAccessKey")
        if secret is not None:
            _decode_key(secret)
        return cls(
            fields["HostName"], fields["DeviceId"], secret, fields.get("ModuleId"), fields.get("GatewayHostName")
        )

    @property
    def resource_uri(self) -> str:
        uri = f"{self.host_name}/devices/{self.device_id}"
        return f"{uri}/modules/{self.module_id}" if self.module_id else uri

    def token(self, expiry: int) -> str:
        """A SAS token for this device valid until ``expiry`` (epoch seconds)."""
        if self.shared_access_key is None:
            raise ValueError("this connection string has no SharedAccessKey")
        return make_sas_token(self.resource_uri, self.shared_access_key, expiry)

    def __repr__(self) -> str:  # never show the key
        return f"ConnectionString(host_name={self.host_name!r}, device_id={self.device_id!r}, key=<hidden>)"


@dataclass(frozen=True, slots=True)
class ServiceCredential:
    """A shared access policy (``HostName=...;SharedAccessKeyName=...;SharedAccessKey=...``): service calls."""

    host_name: str
    key_name: str
    key: str

    @classmethod
    def parse(cls, text: str) -> ServiceCredential:
        fields = _fields(text)
        try:
            return cls(fields["HostName"], fields["SharedAccessKeyName"], fields["SharedAccessKey"])
        except KeyError as missing:
            raise ValueError(f"service connection string lacks {missing.args[0]}") from None

    def token(self, expiry: int) -> str:
        return make_sas_token(self.host_name, self.key, expiry, self.key_name)

    def __repr__(self) -> str:  # never show the key
        return f"ServiceCredential(host_name={self.host_name!r}, key_name={self.key_name!r}, key=<hidden>)"


def _fields(text: str) -> dict[str, str]:
    """``Name=value;Name=value`` (values may contain ``=``, as base64 keys do)."""
    fields: dict[str, str] = {}
    for part in text.strip().split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise ValueError(f"bad connection string field {key!r}: expected Name=value")
        fields[key.strip()] = value.strip()
    return fields


@dataclass(frozen=True, slots=True)
class SasToken:
    resource_uri: str
    signature: str
    expiry: int
    key_name: str | None


def _decode_key(key: str) -> bytes:
    try:
        return base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("SharedAccessKey is not valid base64") from None


def _sign(resource_uri: str, key: str, expiry: int) -> str:
    message = f"{quote_plus(resource_uri)}\n{expiry}".encode()
    digest = hmac.new(_decode_key(key), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def make_sas_token(resource_uri: str, key: str, expiry: int, key_name: str | None = None) -> str:
    """A SAS token; the token and its signature (as sent and as decoded) are registered as minted secrets.

    Registering here, where every token of the process is made, means no caller has to remember to:
    a redactor (``gateway.sidecar.security.Redactor``) reads :func:`minted_secrets` and blanks them in
    any text, including a peer's error message that echoes the request's signature.
    """
    signature = _sign(resource_uri, key, expiry)
    quoted = quote(signature, safe="")
    token = f"SharedAccessSignature sr={quote_plus(resource_uri)}&sig={quoted}&se={expiry}"
    token += f"&skn={quote_plus(key_name)}" if key_name else ""
    _MINTED.add(token, signature, quoted, quote_plus(signature))
    return token


class _MintedSecrets:
    """The secrets this process minted at run time, newest last; bounded, thread-safe, versioned.

    Bounded because a long-lived process mints a token per device per renewal: the oldest (long
    expired, with a one-hour default lifetime) are forgotten first. Readers compare :attr:`version`
    to rebuild their matchers only when something was added.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._values: dict[str, None] = {}  # insertion-ordered set
        self._lock = threading.Lock()
        self.version = 0

    def add(self, *values: str) -> None:
        with self._lock:
            for value in values:
                if value and value not in self._values:
                    self._values[value] = None
                    if len(self._values) > self._limit:
                        del self._values[next(iter(self._values))]
            self.version += 1

    def snapshot(self) -> tuple[int, tuple[str, ...]]:
        with self._lock:
            return self.version, tuple(self._values)


_MINTED = _MintedSecrets(limit=4096)


def register_secret(*values: str) -> None:
    """Register secrets minted outside :func:`make_sas_token` (a token from elsewhere, a derived key)."""
    _MINTED.add(*(v for v in values if isinstance(v, str)))


def minted_secrets() -> tuple[int, tuple[str, ...]]:
    """(version, values): every token and signature this process minted (the newest 4096 values)."""
    return _MINTED.snapshot()


def minted_version() -> int:
    """Grows whenever a secret is registered: a reader re-reads :func:`minted_secrets` only then (cheap)."""
    return _MINTED.version


def parse_sas_token(token: str) -> SasToken:
    prefix = "SharedAccessSignature "
    if not token.startswith(prefix):
        raise ValueError("not a SharedAccessSignature token")
    fields = parse_qs(token[len(prefix) :], keep_blank_values=True, max_num_fields=8)
    try:
        uri, sig, se = fields["sr"][0], fields["sig"][0], int(fields["se"][0])
    except (KeyError, IndexError, ValueError):
        raise ValueError("SAS token lacks sr, sig or a numeric se") from None
    return SasToken(uri, sig, se, fields.get("skn", [None])[0])


def verify_sas_token(token: str, resource_uri: str, key: str, now: float) -> str | None:
    """Why ``token`` is not valid for ``resource_uri`` at ``now``, or None when it is.

    The answers are ``"malformed"``, ``"expired"`` and ``"mismatch"``: the emulator renders the first and
    last as a permanent refusal and ``"expired"`` as IoT Hub's 401003, so clients learn to renew.
    """
    try:
        parsed = parse_sas_token(token)
    except ValueError:
        return "malformed"
    if parsed.resource_uri.rstrip("/").lower() != resource_uri.rstrip("/").lower():
        return "mismatch"
    if not hmac.compare_digest(parsed.signature, _sign(parsed.resource_uri, key, parsed.expiry)):
        return "mismatch"
    if parsed.expiry <= now:
        return "expired"
    return None
