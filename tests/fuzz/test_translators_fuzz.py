"""Every public translator and ``normalize`` under hostile input (issue 13).

The contract, per function: it returns None or an ``IoTHubError`` with a catalog code, or raises its
documented ``ValueError`` / ``TypeError``; nothing else escapes. Work per call is bounded by input
limits (counted items pulled from endless iterables, refused over-long topics) and memory by a
tracemalloc peak; hypothesis' deadline is only a generous backstop against a hang.
"""

from __future__ import annotations

import itertools
import time
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.amqp import translate as amqp_translate
from adapters.amqp import translate_cbs
from adapters.http import translate as http_translate
from adapters.mqtt import translate as mqtt_translate
from adapters.mqtt import translate_topic
from gateway import normalize
from gateway.codes import lookup, parse_code
from tests.fuzz.hostile import (
    HUGE_INTS,
    Boom,
    Counting,
    HostileBytes,
    HostileInt,
    HostileStr,
    Unprintable,
    assert_coded,
    json_like,
    peak_memory,
    scalars,
)

# Modest example counts: these run in every CI build. The deadline is a backstop, not a measurement.
FUZZ = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def call(fn: Any, *args: Any, **kwargs: Any) -> object:
    """Call a translator; its documented errors are fine, anything else (a Boom above all) is a bug."""
    try:
        result = fn(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        assert not isinstance(exc.__cause__, Boom) or isinstance(exc, ValueError)
        return exc
    assert_coded(result)
    return result


# --- MQTT --------------------------------------------------------------------------------------------------


def test_mqtt_endless_user_properties_are_read_a_bounded_amount() -> None:
    endless = Counting(("status", "0501"))
    err = mqtt_translate(135, protocol_version=5, packet="puback", properties={"user_properties": endless})
    assert err is not None and err.code == lookup(429001).code  # the first pair still counts
    assert endless.pulled <= 257
    junk = Counting(None)  # pairs that are not pairs count toward the bound too
    assert mqtt_translate(135, protocol_version=5, packet="puback", properties={"user_properties": junk}) is not None
    assert junk.pulled <= 257
    assert mqtt_translate(135, protocol_version=5, properties={"user_properties": itertools.count()}) is not None

    class Props:  # paho's shape, not a mapping
        UserProperty = Counting(None)
        ReasonString = HostileStr("why")

    assert mqtt_translate(135, protocol_version=5, packet="puback", properties=Props()) is not None
    assert Props.UserProperty.pulled <= 257


def test_mqtt_many_invalid_pairs_cost_the_same_as_few() -> None:
    many = [None] * 1_000_000
    assert peak_memory(lambda: mqtt_translate(135, protocol_version=5, properties={"user_properties": many})) < 200_000


@pytest.mark.parametrize("key", ["status", "trace-id", "reason"])
@pytest.mark.parametrize("huge", HUGE_INTS, ids=["big", "negative", "pow2"])
def test_mqtt_huge_ints_in_properties_are_ignored(key: str, huge: int) -> None:
    err = mqtt_translate(135, protocol_version=5, packet="puback", properties={key: huge})
    assert err is not None and (err.code, err.exact) == (401003, False)
    err = mqtt_translate(135, protocol_version=5, packet="puback", properties={"user_properties": [(key, huge)]})
    assert err is not None and err.code == 401003


def test_mqtt_str_subclasses_whose_methods_raise() -> None:
    status = {"status": HostileStr("0502")}
    err = mqtt_translate(151, protocol_version=5, packet=HostileStr("puback"), properties=status)
    assert err is not None and (err.code, err.exact) == (403002, True)

    class Props:
        UserProperty = ((HostileStr("status"), HostileStr("0501")), ("trace-id", HostileStr("t-1")))
        ReasonString = HostileStr("throttled")

    err = mqtt_translate(151, protocol_version=5, packet="puback", properties=Props())
    assert err is not None and err.code == 429001 and err.tracking_id == "t-1" and "throttled" in err.message
    for bad in (HostileStr("nope"), HostileInt(4), Unprintable()):
        with pytest.raises(ValueError):
            mqtt_translate(135, protocol_version=5, packet=bad)
    assert mqtt_translate(HostileInt(135), protocol_version=HostileInt(5)) is not None
    err = mqtt_translate(131, protocol_version=5, properties={"status": HostileBytes(b"0501")})
    assert err is not None and err.code == 429001


def test_mqtt_topics_are_bounded_and_hostile_strings_copied() -> None:
    with pytest.raises(ValueError, match="over"):
        translate_topic("$iothub/twin/res/400/?$rid=" + "1" * 5_000_000)
    with pytest.raises(ValueError, match="over"):
        translate_topic(b"$iothub/twin/res/400/?$rid=" + b"1" * 5_000_000)
    err = translate_topic(HostileStr("$iothub/twin/res/429/?$rid=1"), HostileStr('{"errorCode":429001}'))
    assert err is not None and (err.code, err.exact) == (429001, True)
    err = translate_topic(HostileBytes(b"$iothub/twin/res/429/?$rid=1"), HostileBytes(b'{"errorCode":429001}'))
    assert err is not None and err.code == 429001


properties = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["status", "trace-id", "reason", "user_properties", "ReasonString", "x"]),
                    scalars, max_size=4),
    st.builds(lambda pairs: {"user_properties": pairs}, st.lists(st.tuples(st.text(max_size=10), scalars),
                                                                max_size=5)),
    scalars,
)


@FUZZ
@given(code=st.integers(-5, 300) | scalars, version=st.sampled_from([3, 4, 5]) | scalars,
       packet=st.sampled_from([None, "connack", "puback", "suback", "disconnect"]) | scalars, props=properties)
def test_mqtt_translate_contract(code: object, version: object, packet: object, props: object) -> None:
    call(mqtt_translate, code, protocol_version=version, packet=packet, properties=props)


@FUZZ
@given(topic=st.text(max_size=80) | st.from_regex(r"\$iothub/(twin|methods)/res/[0-9]{3}/\?\$rid=.{0,20}") | scalars,
       payload=json_like.map(lambda v: __import__("json").dumps(v)) | scalars)
def test_mqtt_translate_topic_contract(topic: object, payload: object) -> None:
    call(translate_topic, topic, payload)


# --- AMQP --------------------------------------------------------------------------------------------------


def test_amqp_str_subclasses_whose_methods_raise() -> None:
    info = {HostileStr("status-code"): HostileStr("429"), "com.microsoft:tracking-id": HostileStr("t-2"),
            "error-code": HostileInt(429001)}
    err = amqp_translate(HostileStr("amqp:link:stolen"), HostileStr("ErrorCode:429001"), info)
    assert (err.code, err.exact, err.tracking_id) == (429001, True, "t-2")
    assert translate_cbs(HostileStr("401"), HostileStr("x"), {"status-code": HostileStr("x")}) is not None
    with pytest.raises(ValueError):
        translate_cbs(HostileStr("4011"))
    with pytest.raises(ValueError):
        translate_cbs(HostileInt(401) if False else Unprintable())  # type: ignore[arg-type]

    class Condition:
        name = HostileStr("amqp:internal-error")
        description = HostileBytes(b"oops")
        info = MappingProxyType({"status-code": HostileInt(503)})

    assert amqp_translate(Condition()).code // 1000 == 503  # type: ignore[arg-type]


@pytest.mark.parametrize("huge", HUGE_INTS, ids=["big", "negative", "pow2"])
def test_amqp_huge_ints_in_info(huge: int) -> None:
    for key in ("status-code", "error-code", "retry-after", "retry-after-ms", "com.microsoft:tracking-id"):
        assert_coded(amqp_translate("amqp:internal-error", None, {key: huge}))


infos = st.one_of(st.none(), scalars, st.dictionaries(
    st.sampled_from(["status-code", "error-code", "com.microsoft:tracking-id", "retry-after", "retry-after-ms"])
    | st.text(max_size=10) | st.binary(max_size=10) | st.integers(),  # hostile keys: their own test above
    scalars, max_size=5))


@FUZZ
@given(condition=st.sampled_from(["amqp:link:stolen", "amqp:resource-locked", "", "x"]) | scalars,
       description=st.text(max_size=60) | st.from_regex(r"ErrorCode:[0-9A-Za-z]{1,8}") | scalars, info=infos)
def test_amqp_translate_contract(condition: object, description: object, info: object) -> None:
    call(amqp_translate, condition, description, info)


@FUZZ
@given(status=st.integers(0, 700) | scalars, description=st.text(max_size=60) | scalars, info=infos)
def test_amqp_translate_cbs_contract(status: object, description: object, info: object) -> None:
    call(translate_cbs, status, description, info)


# --- HTTP --------------------------------------------------------------------------------------------------


@FUZZ
@given(status=st.integers(0, 700) | scalars,
       headers=st.none() | st.dictionaries(st.sampled_from(["iothub-errorcode", "Retry-After", "x-ms-substatus",
                                                            "x-ms-retry-after-ms", "Date"]) | st.text(max_size=8),
                                           scalars, max_size=4) | scalars,
       body=json_like.map(lambda v: __import__("json").dumps(v)) | json_like | scalars)
def test_http_translate_contract(status: object, headers: object, body: object) -> None:
    call(http_translate, status, headers, body)


def test_http_endless_headers_are_read_a_bounded_amount() -> None:
    endless = Counting(("x-other", "1"))
    assert http_translate(503, endless, None) is not None
    assert endless.pulled <= 1025


# --- codes: the passthrough decision, the same through every translator ------------------------------------


def test_an_unlisted_code_is_never_carried_as_itself() -> None:
    """The same rule in every translator: an unlisted code says no more than its status family, and a
    status the peer stated says at least as much."""
    unlisted = 429999
    family = lookup(unlisted)
    assert (family.code, family.known) == (429000, False)
    results = {
        "http header": http_translate(429, {"iothub-errorcode": str(unlisted)}),
        "http body": http_translate(429, None, f'{{"errorCode":{unlisted}}}'),
        "http body, other status": http_translate(400, None, f'{{"errorCode":{unlisted}}}'),
        "mqtt status": mqtt_translate(131, protocol_version=5, properties={"status": str(unlisted)}),
        "mqtt topic": translate_topic("$iothub/twin/res/429/?$rid=1", f'{{"errorCode":{unlisted}}}'),
        "mqtt topic, other status": translate_topic("$iothub/twin/res/400/?$rid=1", f'{{"errorCode":{unlisted}}}'),
        "amqp description": amqp_translate("x", f"ErrorCode:{unlisted}"),
        "amqp info": amqp_translate("x", None, {"error-code": unlisted}),
        "amqp info, status given": amqp_translate("x", None, {"error-code": unlisted, "status-code": 429}),
    }
    expected = {"http body, other status": 400000, "mqtt topic, other status": 400000}
    for name, err in results.items():
        assert err is not None and err.exact is False, name
        assert err.code == expected.get(name, 429000), (name, err.code)


# --- normalize ---------------------------------------------------------------------------------------------


class RaisingStr(Exception):
    def __str__(self) -> str:
        raise Boom("str")


class RaisingErrno(OSError):
    @property  # type: ignore[override]
    def errno(self) -> int:
        raise Boom("errno")


class RaisingOsError(Exception):
    @property
    def os_error(self) -> OSError:
        raise Boom("os_error")


class RaisingBool(Exception):
    def __bool__(self) -> bool:
        raise Boom("bool")


class RaisingCause(Exception):
    @property  # type: ignore[override]
    def __cause__(self) -> BaseException:
        raise Boom("cause")


@pytest.mark.parametrize(
    "exc",
    [
        OSError(10**5000, "x"),
        OSError(-(10**5000), "x"),
        SystemExit(10**4300),
        RaisingStr(),
        RaisingErrno(),
        RaisingOsError(),
        RaisingBool(),
        RaisingCause(),
        OSError([1], "x"),
        OSError({}, "x"),
        Exception(Unprintable()),
        Exception("x" * 10_000_000),
        KeyboardInterrupt(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_normalize_returns_an_error_for_any_exception(exc: BaseException) -> None:
    err = normalize(exc)
    assert_coded(err)
    assert err.__cause__ is exc
    assert len(err.message) <= 500


@pytest.mark.parametrize("bad", ["x", None, 42, Unprintable(), ValueError])
def test_normalize_wrong_type_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError):
        normalize(bad)  # type: ignore[arg-type]


exceptions = st.builds(
    lambda cls, args: cls(*args),
    st.sampled_from([OSError, ConnectionResetError, TimeoutError, Exception, RuntimeError, EOFError, SystemExit]),
    st.lists(scalars, max_size=3),
)


@FUZZ
@given(exc=exceptions, cause=st.none() | exceptions)
def test_normalize_contract(exc: BaseException, cause: BaseException | None) -> None:
    exc.__cause__ = cause
    start = time.monotonic()
    assert_coded(normalize(exc))
    assert time.monotonic() - start < 5  # a backstop against a hang, not a measurement


@FUZZ
@given(value=scalars | st.integers() | st.text(max_size=8))
def test_parse_code_contract(value: object) -> None:
    try:
        number = parse_code(value)
    except ValueError:
        return
    assert 300_000 <= number <= 599_999


# --- bounds: memory per call, and items looked at ---------------------------------------------------------

def _big_text() -> str:
    return "ErrorCode:" + "x" * 5_000_000


def _big_body() -> bytes:
    return b'{"errorCode": 404103, "message": "' + b"m" * 5_000_000 + b'"}'


# Each case builds its (megabytes of) input first; only the call itself is measured.
MEMORY_CASES = {
    "http-body-headers": lambda: (http_translate, (500, {"Retry-After": "1" * 5_000_000, "x": "y" * 5_000_000},
                                                   _big_body()), {}),
    "http-text": lambda: (http_translate, (500, None, _big_text()), {}),
    "mqtt-props": lambda: (mqtt_translate, (131,), {"protocol_version": 5, "properties": {
        "status": "0" * 5_000_000, "reason": _big_text(), "trace-id": _big_text()}}),
    "mqtt-topic": lambda: (translate_topic, ("$iothub/twin/res/404/?$rid=" + "1" * 60_000, _big_body()), {}),
    "amqp": lambda: (amqp_translate, ("amqp:internal-error" + "x" * 5_000_000, _big_text(),
                                      {"status-code": "5" * 5_000_000}), {}),
    "cbs": lambda: (translate_cbs, (401, _big_text(), {"com.microsoft:tracking-id": _big_text()}), {}),
    "normalize": lambda: (normalize, (OSError(5, _big_text()),), {}),
}


@pytest.mark.parametrize("case", MEMORY_CASES)
def test_memory_per_call_is_bounded_whatever_the_input_size(case: str) -> None:
    # Inputs are megabytes; what a call allocates must not grow with them (the caps are tens of kB).
    fn, args, kwargs = MEMORY_CASES[case]()
    assert peak_memory(lambda: fn(*args, **kwargs)) < 1_000_000


class EndlessInfo(dict[str, object]):
    """A mapping whose items never end: the AMQP info map is read a bounded number of entries."""

    pulled = 0

    def items(self) -> Any:
        def endless() -> Any:
            for n in itertools.count():
                EndlessInfo.pulled += 1
                yield f"k{n}", n

        return endless()


def test_amqp_info_is_read_a_bounded_number_of_entries() -> None:
    assert_coded(amqp_translate("amqp:internal-error", None, EndlessInfo()))
    assert EndlessInfo.pulled <= 65
