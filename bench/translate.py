"""Cost of translate() per transport, next to the floor measured in the same run.

The floor is what any classifier must at least pay: one dict lookup plus constructing a bare exception
(and, for HTTP, ``json.loads`` of the same body). Run: ``python bench/translate.py``.
Targets: MQTT and AMQP within 3x of the floor; HTTP with a JSON body within 1.5x of json.loads + floor.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Run as a script, bench/ comes first on sys.path, where bench/http.py would shadow the stdlib's http.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

from adapters.amqp import translate as amqp_translate
from adapters.http import translate as http_translate
from adapters.mqtt import translate as mqtt_translate

LOOPS = 2000
REPEATS = 15

HTTP_BODY = json.dumps(
    {
        "Message": json.dumps(
            {
                "errorCode": 429001,
                "trackingId": "95ae2f6f2e5b4cd9a8f5b1f7c2d4e6a8-G:5-TimeStamp:10/19/2022 16:47:22",
                "message": "IotHub throttling limit exceeded.",
                "timestampUtc": "2022-10-19T16:47:22.1234567Z",
            }
        ),
        "ExceptionMessage": "",
    }
).encode()
HTTP_HEADERS = {
    "Content-Type": "application/json; charset=utf-8",
    "Retry-After": "7",
    "iothub-errorcode": "ThrottlingException",
}
MQTT_PROPS = {"status": "0501", "trace-id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0"}
AMQP_INFO = {"status-code": 429, "com.microsoft:tracking-id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0-G:5"}

_FLOOR_TABLE = {429: "ThrottlingException", 142: "ConnectionForcefullyClosedOnNewConnection", "amqp:link:stolen": "x"}


def per_call_ns(fn: Callable[[], object]) -> float:
    """Median over REPEATS of the mean cost of one call in a tight loop of LOOPS calls."""
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        for _ in range(LOOPS):
            fn()
        samples.append((time.perf_counter_ns() - start) / LOOPS)
    return statistics.median(samples)


def floor(key: object) -> Callable[[], object]:
    def call() -> object:
        return RuntimeError(_FLOOR_TABLE.get(key))  # type: ignore[call-overload]

    return call


def main() -> None:
    cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        ("mqtt  puback 151 + status 0501", lambda: mqtt_translate(151, protocol_version=5, packet="puback",
                                                                  properties=MQTT_PROPS), floor(142)),
        ("mqtt  3.1.1 CONNACK 5", lambda: mqtt_translate(5, protocol_version=4, packet="connack"), floor(142)),
        ("amqp  amqp:link:stolen + info", lambda: amqp_translate("amqp:link:stolen", "stolen", AMQP_INFO),
         floor("amqp:link:stolen")),
        ("amqp  device-container-throttled", lambda: amqp_translate("com.microsoft:device-container-throttled"),
         floor("amqp:link:stolen")),
    ]
    json_floor = floor(429)

    def http_floor() -> object:
        json.loads(HTTP_BODY)
        return json_floor()

    cases.append(("http  429 nested JSON + headers", lambda: http_translate(429, HTTP_HEADERS, HTTP_BODY), http_floor))
    cases.append(("http  bare 503, no body", lambda: http_translate(503), json_floor))

    print(f"{'case':<36} {'translate':>12} {'floor':>12} {'ratio':>7}")
    for name, fn, base in cases:
        ours, theirs = per_call_ns(fn), per_call_ns(base)
        print(f"{name:<36} {ours:>10.0f}ns {theirs:>10.0f}ns {ours / theirs:>6.2f}x")


if __name__ == "__main__":
    main()
