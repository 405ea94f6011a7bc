"""What keeps the sidecar's secrets in and abusive callers out.

- :class:`Redactor` blanks SAS keys, SAS tokens, connection strings and bearer tokens in any text: the
  configured secret values verbatim, every token and signature the process minted (registered by
  ``gateway.sas`` when made), and anything shaped like one (a key we were never told about, a
  signature echoed next to ``sr=`` / ``se=``). Logs, API answers, events and the metrics page all go
  through it.
- :func:`token_matches` compares bearer tokens in constant time.
- :class:`RateLimiter`: a token bucket per client address; the caller answers 429 with Retry-After.
"""

from __future__ import annotations

import hmac
import json
import re
import time
from collections.abc import Callable, Iterable
from urllib.parse import unquote

from gateway.sas import minted_secrets, minted_version

__all__ = ["MASK", "RateLimiter", "Redactor", "token_matches"]

MASK = "***"

# Shapes of secrets, whatever their value: the key field of a connection string, a SAS token's signature
# (and the whole token), an Authorization header's credential.
_PATTERNS = (
    r"(SharedAccessKey\s*=\s*)[^;\s\"',}]+",
    r"(SharedAccessSignature\s+)[^\s\"',}]+",
    r"([?&;\s\"']sig=)[^&\s\"',;}]+",
    r"(\bBearer\s+)[^\s\"',}]+",
    r"(\"?(?:password|token|sas_token|api_key)\"?\s*[:=]\s*\"?)[^\s\"',;}]{6,}",
)


# Every shape above contains one of these (case-insensitively): a cheap test before the regex.
_TRIGGERS = ("sharedaccess", "sig=", "bearer", "password", "token", "api_key")
_KEY_FIELD = re.compile(r"SharedAccessKey\s*=\s*([^;\s]+)", re.IGNORECASE)

# The shape of a SAS signature (base64 of an HMAC-SHA256: 43 characters and one "=") and of a SharedAccessKey
# of 32 bytes, as sent (URL-encoded: %2B %2F %3D) or decoded, standing alone (not inside a longer run).
_SIGNATURE = re.compile(
    r"(?<![A-Za-z0-9+/%])((?:[A-Za-z0-9+/]|%2[BbFf]){43}(?:=|%3[Dd]))(?![A-Za-z0-9+/=%])"
)
# A SAS token's other fields: where they show, a signature-shaped value nearby is that token's signature.
_SAS_CONTEXT = re.compile(r"(?<![A-Za-z0-9])(?:sr|se|skn)=", re.IGNORECASE)


class Redactor:
    """Replaces known secret values and secret-shaped substrings with ``***``.

    What it blanks, in this order:

    1. configured secrets verbatim (and the key inside a connection string), learnt at start or by
       :meth:`add`; values shorter than 6 characters are not secrets (the config refuses such tokens);
    2. every SAS token and signature the process minted (``gateway.sas`` registers each one when it
       makes it), in any spelling: as sent (URL-encoded) or decoded, whole or echoed by a peer;
    3. a signature-shaped value (44 characters of base64 ending in ``=``) in any text that also holds a
       SAS token's ``sr=``, ``se=`` or ``skn=``: a token we did not mint, rebuilt from an echo;
    4. secret shapes whatever their value: ``SharedAccessKey=...``, ``SharedAccessSignature ...``,
       ``sig=...``, ``Bearer ...``, and ``password`` / ``token`` / ``api_key`` fields.
    """

    def __init__(self, secrets: Iterable[str] = (), *, minted: bool = True) -> None:
        self._secrets: set[str] = set()
        self._shaped: dict[str, list[str]] = {}  #: a configured key of a signature's shape -> secrets holding it
        self._literal: re.Pattern[str] | None = None
        self._shapes = re.compile("|".join(f"(?:{p})" for p in _PATTERNS), re.IGNORECASE)
        self._read_minted = minted  #: False: only configured secrets and shapes (tests of the shapes)
        self._minted_version = -1
        self._minted: frozenset[str] = frozenset()
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        """Learn more secret values (e.g. a key issued at run time). Short strings are ignored.

        A connection string's key is learnt too, so the key alone is blanked wherever it shows up.
        """
        keys = [m.group(1) for s in secrets for m in _KEY_FIELD.finditer(s)]
        values = {s for s in (*secrets, *keys) if s and len(s) >= 6}
        # As JSON spells them too: API answers, events and JSON logs are redacted after json.dumps.
        values |= {json.dumps(s)[1:-1] for s in values}
        fresh = values - self._secrets
        if not fresh:
            return
        self._secrets |= fresh
        # A secret that is, or holds, a key of a signature's shape (a 32-byte device key) is found by the
        # one _SIGNATURE scan and a set lookup, not by the alternation below, whose cost grows with the
        # number of secrets: 10,000 devices made it seconds per API page.
        literal_added = False
        for value in fresh:
            key = value if _SIGNATURE.fullmatch(value) else None
            if key is None:
                field = _KEY_FIELD.search(value)
                key = field.group(1) if field is not None and _SIGNATURE.fullmatch(field.group(1)) else None
            if key is None:
                literal_added = True
                continue
            holders = self._shaped.setdefault(key, [])
            if value != key:
                holders.append(value)
                holders.sort(key=len, reverse=True)
        if literal_added:
            # Longest first, so a connection string is blanked whole before its key is looked for.
            ordered = sorted((s for s in self._secrets if not self._is_shaped(s)), key=len, reverse=True)
            self._literal = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None

    def _is_shaped(self, value: str) -> bool:
        if value in self._shaped:
            return True
        field = _KEY_FIELD.search(value)
        return field is not None and value in self._shaped.get(field.group(1), ())

    def _configured_keys(self, text: str) -> str:
        """Blank the configured signature-shaped keys, and whole the secrets holding them (connection strings)."""
        found = {m.group(1) for m in _SIGNATURE.finditer(text)}
        found = {k for k in (*found, *(unquote(v) for v in found)) if k in self._shaped}
        if not found:
            return text
        for key in found:
            for holder in self._shaped[key]:
                if holder in text:
                    text = text.replace(holder, MASK)

        def mask(match: re.Match[str]) -> str:
            value = match.group(1)
            return MASK if value in self._shaped or unquote(value) in self._shaped else value

        return _SIGNATURE.sub(mask, text)

    def _minted_values(self) -> frozenset[str]:
        """The minted secrets as sent and URL-decoded; re-read only when the registry changed."""
        if self._read_minted and minted_version() != self._minted_version:
            version, values = minted_secrets()
            self._minted = frozenset(values) | frozenset(unquote(v) for v in values)
            self._minted_version = version
        return self._minted

    def __call__(self, text: str) -> str:
        if self._literal is not None:
            text = self._literal.sub(MASK, text)
        if self._shaped and ("=" in text or "%3" in text):
            text = self._configured_keys(text)
        minted = self._minted_values()
        # Every signature ends in "=" (or "%3D" as sent): text without either holds none.
        if ("=" in text or "%3" in text) and (minted or _SAS_CONTEXT.search(text)):
            text = self._signatures(text, minted)
        lowered = text.lower()
        if not any(t in lowered for t in _TRIGGERS):
            return text
        return self._shapes.sub(_keep_prefix, text)

    def _signatures(self, text: str, minted: frozenset[str]) -> str:
        if "SharedAccessSignature" in text and minted:
            # A whole minted token, in any spelling: blank it before its parts are looked at.
            for token in (m for m in minted if m.startswith("SharedAccessSignature") and m in text):
                text = text.replace(token, MASK)
        in_context = _SAS_CONTEXT.search(text) is not None

        def mask(match: re.Match[str]) -> str:
            value = match.group(1)
            return MASK if in_context or value in minted or unquote(value) in minted else value

        return _SIGNATURE.sub(mask, text)

    def contains_secret(self, text: str) -> bool:
        return self(text) != text


def _keep_prefix(match: re.Match[str]) -> str:
    prefix = next((g for g in match.groups() if g is not None), "")
    return prefix + MASK


def token_matches(expected: str, presented: str | None) -> bool:
    """Constant-time comparison of a bearer token (the time does not depend on where they differ).

    A presented value that is not valid text (a lone surrogate from header bytes that were not
    UTF-8) never raises: it is compared as bytes, and cannot equal a configured (valid UTF-8) token.
    """
    if presented is None:
        presented = ""
    wanted = expected.encode("utf-8", "surrogatepass")
    given = presented.encode("utf-8", "surrogatepass")  # any str encodes this way; lone surrogates never match
    return hmac.compare_digest(wanted, given)


class RateLimiter:
    """A token bucket per key (client address): ``rate`` per second, bursts up to ``burst``.

    Bounded memory: at most ``max_keys`` buckets; the oldest is forgotten first (it refills to full
    anyway after ``burst / rate`` seconds).
    """

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 4096) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> float:
        """0 when the request may go ahead; else the seconds until a token is available."""
        if self.rate <= 0:
            return 0.0
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        if len(self._buckets) > self._max_keys:
            del self._buckets[next(iter(self._buckets))]
        return wait
