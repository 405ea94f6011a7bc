"""Logging for the sidecar: stdlib logging, text or JSON lines, secrets redacted, repeats rate-limited.

State changes are logged with ``extra={"device": ..., "code": ..., "name": ..., "action": ...}``; both
formats show those fields. The redaction runs on the fully formatted line (traceback included), so no
code path can log a secret by accident. A record whose message cannot be formatted is still written
(its template, redacted) instead of going to logging's error path, which would print its raw
arguments to stderr. An identical warning or error (same logger, same template, same arguments) is
logged at most once per ``interval`` seconds; the next one that passes says how many were suppressed.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from gateway.sidecar.security import Redactor

__all__ = ["FIELDS", "JsonFormatter", "RepeatFilter", "TextFormatter", "setup_logging"]

#: The structured fields a record may carry (``extra=``), in the order they are shown, and their output
#: names (``name`` is taken by LogRecord, so a code's name travels as ``code_name``).
FIELDS = {"device": "device", "transport": "transport", "state": "state", "code": "code", "code_name": "name",
          "action": "action", "until": "until", "reason": "reason", "message_id": "message_id"}


class RepeatFilter(logging.Filter):
    """Drops a warning/error identical to one logged less than ``interval`` seconds ago."""

    def __init__(self, interval: float, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 1024) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._seen: dict[tuple[str, str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or self.interval <= 0:
            return True
        try:
            args = repr(record.args)
        except Exception:
            args = "?"
        key = (record.name, str(record.msg), args)
        now = self._clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        suppressed = last[1] if last is not None else 0
        self._seen.pop(key, None)
        self._seen[key] = (now, 0)
        if len(self._seen) > self._max_keys:
            del self._seen[next(iter(self._seen))]
        if suppressed:
            record.suppressed = suppressed
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {shown: getattr(record, attr) for attr, shown in FIELDS.items() if getattr(record, attr, None) is not None}


class TextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self._format(record)
        except Exception:
            return self._redact(_unformattable(record))

    def _format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        extra = " ".join(f"{k}={v}" for k, v in fields.items() if f"{k}={v}" not in line)
        if extra:
            head, sep, tail = line.partition("\n")
            line = f"{head} [{extra}]{sep}{tail}"
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            head, sep, tail = line.partition("\n")
            line = f"{head} ({suppressed} identical suppressed){sep}{tail}"
        return self._redact(line)


class JsonFormatter(logging.Formatter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self._redact = redact

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self._format(record)
        except Exception:
            return self._redact(json.dumps({"level": record.levelname.lower(), "logger": record.name,
                                            "msg": _unformattable(record)}))

    def _format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update(_fields(record))
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            data["suppressed"] = suppressed
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return self._redact(json.dumps(data, default=str))


def _unformattable(record: logging.LogRecord) -> str:
    """A line for a record whose message cannot be formatted. Formatting errors must not reach logging's
    own error path, which prints the record's raw arguments to stderr without redaction."""
    try:
        template = str(record.msg)[:200]
    except Exception:
        template = "?"
    return f"{record.levelname} {record.name}: (unformattable log message) {template}"


def setup_logging(fmt: str, level: str, redact: Redactor, *, interval: float = 10.0,
                  stream: TextIO | None = None) -> logging.Handler:
    """Install one handler on the root logger (replacing ours from an earlier call); returns it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redact) if fmt == "json" else TextFormatter(redact))
    handler.addFilter(RepeatFilter(interval))
    handler.set_name("iothub-gateway")
    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == "iothub-gateway":
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp's access log would be one line per request: too much for a sidecar taking thousands a second.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("proton").setLevel(logging.WARNING)  # proton says INFO for every connect
    return handler
