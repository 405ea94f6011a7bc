"""adapters.http.translate: every body form, the headers, precedence, Retry-After, and hostile input."""

from __future__ import annotations

import email.utils
import http.client
import io
import itertools
import json
import math
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.http import BODY_LIMIT, translate
from gateway.codes import CATALOG, CodeInfo, all_codes, lookup
from gateway.errors import IoTHubError

TRACKING = "0123456789abcdef0123456789abcdef-G:10-TimeStamp:10/19/2022 16:47:22"
HTTP_ROWS = [row for row in all_codes() if row.http_status is not None]


def must(err: IoTHubError | None) -> IoTHubError:
    assert isinstance(err, IoTHubError)
    assert err.transport == "http"
    return err


# --- body forms, built the way IoT Hub renders them -------------------------------------------------


def legacy(name: str | int, text: str = "Some detail") -> str:
    return json.dumps({"Message": f"ErrorCode:{name};{text}", "ExceptionMessage": f"Tracking ID:{TRACKING}"})


def double_escaped(code: int | str, text: str = "Some detail") -> str:
    inner = {"errorCode": code, "trackingId": TRACKING, "message": text, "timestampUtc": "2022-10-19T16:47:22Z"}
    return json.dumps({"Message": json.dumps(inner), "ExceptionMessage": ""})


def nested(code: int | str, text: str = "Some detail") -> str:
    return json.dumps({"Message": {"errorCode": code, "trackingId": TRACKING, "message": text}})


def top_level(code: int | str, text: str = "Some detail") -> str:
    return json.dumps({"errorCode": code, "trackingId": TRACKING, "message": text, "timestampUtc": "x"})


FORMS: dict[str, Callable[[CodeInfo], Any]] = {
    "legacy-name": lambda row: legacy(row.name),
    "legacy-digits": lambda row: legacy(row.code),
    "double-escaped-number": lambda row: double_escaped(row.code),
    "double-escaped-string": lambda row: double_escaped(str(row.code)),
    "nested-object": lambda row: nested(str(row.code)),
    "top-level-number": lambda row: top_level(row.code),
    "top-level-string-bytes": lambda row: top_level(str(row.code)).encode(),
    "pascal-case-keys": lambda row: json.dumps({"ErrorCode": row.code, "Message": "x", "TrackingId": TRACKING}),
    "already-parsed-dict": lambda row: {"Message": f"ErrorCode:{row.name};text"},
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_catalog_code_round_trips_through_every_body_form(form: str) -> None:
    wrong = []
    for row in HTTP_ROWS:
        assert row.http_status is not None
        err = must(translate(row.http_status, None, FORMS[form](row)))
        if (err.code, err.exact) != (row.code, True):
            wrong.append((row.code, err.code, err.exact))
    assert wrong == []
    assert len(HTTP_ROWS) > 150


def test_every_catalog_code_round_trips_through_the_header() -> None:
    for row in HTTP_ROWS:
        assert row.http_status is not None
        for value in (row.name, str(row.code), row.name.upper()):
            err = must(translate(row.http_status, {"iothub-errorcode": value}))
            assert (err.code, err.exact) == (row.code, True), value


def test_aliases_are_read_as_their_canonical_code() -> None:
    assert must(translate(404, None, top_level(404102))).code == 404103
    assert must(translate(500, None, top_level(500026))).code == 500301
    assert must(translate(401, None, legacy("IoTHubUnauthorized"))).code == 401003
    assert must(translate(429, {"iothub-errorcode": "IotHubThrottled"})).code == 429001
    assert must(translate(404, None, top_level(404102))).exact


# --- what the body says, in detail --------------------------------------------------------------------

BODY_CASES: list[tuple[str, int, Any, int, str | None, str | None]] = [
    # (id, status, body, code, tracking id, message)
    ("legacy", 404, legacy("DeviceNotFound", "Device d1 not registered"), 404001, TRACKING, "Device d1 not registered"),
    ("legacy digits", 404, legacy(404103, "offline"), 404103, TRACKING, "offline"),
    (
        "legacy code mid-message",
        404,
        json.dumps({"Message": "Request failed;ErrorCode:DeviceNotOnline;device is offline"}),
        404103,
        None,
        "Request failed device is offline",
    ),
    (
        "legacy tracking in Message",
        412,
        json.dumps({"Message": f"ErrorCode:PreconditionFailed;Precondition failed Tracking ID:{TRACKING}"}),
        412001,
        TRACKING,
        "Precondition failed",
    ),
    ("double-escaped", 404, double_escaped(404103, "Timed out"), 404103, TRACKING, "Timed out"),
    ("double-escaped string code", 412, double_escaped("412002", "lock lost"), 412002, TRACKING, "lock lost"),
    ("nested object", 404, nested("404104", "closed"), 404104, TRACKING, "closed"),
    ("top level", 429, top_level(429001, "Throttled"), 429001, TRACKING, "Throttled"),
    ("top level, code as name", 404, top_level("DeviceNotFound"), 404001, TRACKING, "Some detail"),
    (
        "twice-escaped string",
        404,
        json.dumps({"Message": json.dumps(json.dumps({"errorCode": 404103, "message": "deep"}))}),
        404103,
        None,
        "deep",
    ),
    ("body is a JSON string", 404, json.dumps("ErrorCode:DeviceNotFound;gone"), 404001, None, "gone"),
    (
        "upper-case keys",
        403,
        json.dumps({"ERRORCODE": "403002", "MESSAGE": "quota", "TRACKINGID": "t-1"}),
        403002,
        "t-1",
        "quota",
    ),
    (
        "lower-case message key, legacy text",
        401,
        json.dumps({"message": "ErrorCode:IotHubUnauthorized;exp"}),
        401003,
        None,
        "exp",
    ),
    ("loose legacy casing", 404, json.dumps({"Message": "errorcode : DeviceNotFound; gone"}), 404001, None, "gone"),
    ("code in 'error_code'", 404, json.dumps({"error_code": 404103}), 404103, None, None),
    ("numeric tracking id", 429, json.dumps({"errorCode": 429001, "trackingId": 12345}), 429001, "12345", None),
    ("dict body", 404, {"errorCode": 404103, "trackingId": "t", "message": "m"}, 404103, "t", "m"),
    ("bytes body", 404, legacy("DeviceNotFound").encode(), 404001, TRACKING, "Some detail"),
    ("bytearray body", 404, bytearray(top_level(404103).encode()), 404103, TRACKING, "Some detail"),
    ("memoryview body", 404, memoryview(top_level(404103).encode()), 404103, TRACKING, "Some detail"),
    ("utf-8 BOM", 404, "\ufeff" + top_level(404103), 404103, TRACKING, "Some detail"),
    ("leading whitespace", 404, "\r\n  " + top_level(404103), 404103, TRACKING, "Some detail"),
]


@pytest.mark.parametrize(
    ("status", "body", "code", "tracking", "message"),
    [case[1:] for case in BODY_CASES],
    ids=[case[0] for case in BODY_CASES],
)
def test_body_forms(status: int, body: Any, code: int, tracking: str | None, message: str | None) -> None:
    err = must(translate(status, None, body))
    assert err.code == code
    assert err.exact is True
    assert err.tracking_id == tracking
    assert err.message == (message if message is not None else CATALOG[code].description)


@pytest.mark.parametrize(
    ("body", "code", "action"),
    [
        (legacy("DeviceNotFound"), 404001, "stop"),
        (double_escaped(404103), 404103, "wait_for_device"),
        (top_level(404104), 404104, "reconnect"),
    ],
)
def test_the_three_404s_are_told_apart_by_the_body(body: str, code: int, action: str) -> None:
    err = must(translate(404, None, body))
    assert (err.code, err.action.value) == (code, action)


def test_412_precondition_and_lock_lost_are_told_apart_by_the_body() -> None:
    assert must(translate(412, None, legacy("PreconditionFailed"))).code == 412001
    assert must(translate(412, None, double_escaped(412002))).code == 412002
    assert must(translate(412)).code == 412000


def test_body_code_wins_even_when_its_status_differs() -> None:
    err = must(translate(400, None, top_level(404103)))
    assert (err.code, err.http_status) == (404103, 404)


def test_unknown_six_digit_body_code_resolves_to_its_family_not_exact() -> None:
    # An unlisted code is never carried as itself: it says no more than its family, and the status
    # (which the hub did state) says as much, so the status decides, inexact ...
    err = must(translate(429, None, top_level(429999)))
    assert (err.code, err.exact) == (429000, False)
    assert err.native["body_error_code"] == 429999
    err = must(translate(400, None, top_level(429999)))
    assert (err.code, err.exact) == (400000, False)
    # ... and a header naming a listed code says more than it does.
    err = must(translate(404, {"iothub-errorcode": "DeviceNotFound"}, top_level(404999)))
    assert (err.code, err.exact) == (404001, True)
    assert err.native["body_error_code"] == 404999
    header_only = must(translate(429, {"iothub-errorcode": "429999"}))
    assert (header_only.code, header_only.exact) == (429000, False)


@pytest.mark.parametrize("bad", [0, 123, 999999, 100000, 299999, 4041030, -404103, "40410", "x", None, True, 404103.5])
def test_invalid_body_code_is_ignored_and_the_header_then_status_decide(bad: Any) -> None:
    body = json.dumps({"errorCode": bad, "message": "m"})
    assert must(translate(404, {"iothub-errorcode": "DeviceNotOnline"}, body)).code == 404103
    err = must(translate(404, None, body))
    assert (err.code, err.exact) == (404000, False)


def test_unknown_legacy_name_falls_back() -> None:
    err = must(translate(503, None, legacy("SomethingNewFromTheHub")))
    assert (err.code, err.exact) == (503000, False)
    assert err.native["body_error_code"] == "SomethingNewFromTheHub"


def test_outer_code_wins_over_inner_message_code() -> None:
    body = json.dumps({"errorCode": 429001, "Message": json.dumps({"errorCode": 404103})})
    assert must(translate(429, None, body)).code == 429001


# --- headers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "code", "exact"),
    [
        ({"iothub-errorcode": "DeviceNotFound"}, 404001, True),
        ({"IoTHub-ErrorCode": "  DeviceNotOnline "}, 404103, True),
        ({"iothub-errorcode": "404104"}, 404104, True),
        ({"iothub-errorcode": b"DeviceNotFound"}, 404001, True),
        ([(b"IOTHUB-ERRORCODE", b"DeviceNotOnline")], 404103, True),
        ([("iothub-errorcode", "DeviceNotOnline")], 404103, True),
        ({"iothub-errorcode": "NoSuchName"}, 404000, False),
        ({"iothub-errorcode": "123"}, 404000, False),
        ({"iothub-errorcode": ""}, 404000, False),
    ],
)
def test_header_only(headers: Any, code: int, exact: bool) -> None:
    err = must(translate(404, headers))
    assert (err.code, err.exact) == (code, exact)


def test_precedence_body_over_header_over_substatus_over_status() -> None:
    headers = {"iothub-errorcode": "DeviceNotFound", "x-ms-substatus": "104"}
    assert must(translate(404, headers, top_level(404103))).code == 404103
    assert must(translate(404, headers, "not json")).code == 404001
    assert must(translate(404, {"x-ms-substatus": "104"})).code == 404104
    assert must(translate(404, {})).code == 404000


@pytest.mark.parametrize(
    ("status", "substatus", "code", "exact"),
    [
        (429, "1", 429001, True),
        (429, "001", 429001, True),
        (404, "103", 404103, True),
        (404, "999", 404000, False),  # 404999 is not in the catalog
        (404, "0", 404000, False),
        (404, "1000", 404000, False),
        (404, "abc", 404000, False),
        (404, "-1", 404000, False),
    ],
)
def test_substatus(status: int, substatus: str, code: int, exact: bool) -> None:
    err = must(translate(status, {"x-ms-substatus": substatus}))
    assert (err.code, err.exact) == (code, exact)
    assert err.native["headers"]["x-ms-substatus"] == substatus


def test_header_forms_http_message_and_multidict() -> None:
    raw = b"Content-Type: application/json\r\nIotHub-ErrorCode: DeviceNotOnline\r\nRetry-After: 9\r\n\r\n"
    message = http.client.parse_headers(io.BytesIO(raw))
    err = must(translate(404, message))
    assert (err.code, err.retry_after) == (404103, 9.0)
    import multidict
    proxy = multidict.CIMultiDictProxy(multidict.CIMultiDict([("Retry-After", "3"), ("retry-after", "99")]))
    assert must(translate(429, proxy)).retry_after == 3.0  # the first of a repeated header wins


def test_tracking_id_sources_in_order() -> None:
    headers = {"iothub-trackingid": "from-header", "x-ms-request-id": "request-id"}
    assert must(translate(404, headers, top_level(404103))).tracking_id == TRACKING
    assert must(translate(404, headers, legacy("DeviceNotFound"))).tracking_id == TRACKING
    assert must(translate(404, headers)).tracking_id == "from-header"
    assert must(translate(404, {"X-MS-Request-Id": "request-id"})).tracking_id == "request-id"
    assert must(translate(404)).tracking_id is None


# --- Retry-After ----------------------------------------------------------------------------------------

DATE = "Wed, 21 Oct 2015 07:28:00 GMT"
DATE_TS = email.utils.parsedate_to_datetime(DATE).timestamp()
LATER = "Wed, 21 Oct 2015 07:28:30 GMT"


@pytest.mark.parametrize(
    ("headers", "now", "retry_after", "retry_at"),
    [
        ({"Retry-After": "7"}, None, 7.0, None),
        ({"Retry-After": " 7 "}, None, 7.0, None),
        ({"Retry-After": "2.5"}, None, 2.5, None),
        ({"Retry-After": "0"}, None, 0.0, None),
        ({"Retry-After": 7}, None, 7.0, None),
        ({"Retry-After": b"7"}, None, 7.0, None),
        ({"Retry-After": "7"}, 1000.0, 7.0, 1007.0),
        ({"Retry-After": LATER}, DATE_TS + 10, 20.0, DATE_TS + 30),
        ({"Retry-After": LATER, "Date": DATE}, None, 30.0, DATE_TS + 30),
        ({"Retry-After": LATER, "Date": DATE}, DATE_TS, 30.0, DATE_TS + 30),  # now wins over Date
        ({"Retry-After": LATER}, None, None, DATE_TS + 30),  # no reference: only the instant
        ({"Retry-After": DATE, "Date": LATER}, None, 0.0, DATE_TS),  # a past date means now
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:30 +0000", "Date": DATE}, None, 30.0, DATE_TS + 30),
        ({"x-ms-retry-after-ms": "1500"}, None, 1.5, None),
        ({"retry-after-ms": "250"}, None, 0.25, None),
        ({"Retry-After": "2", "x-ms-retry-after-ms": "5000"}, None, 5.0, None),  # the larger wins
        ({"Retry-After": "9", "x-ms-retry-after-ms": "5000"}, None, 9.0, None),
        ({"Retry-After": "-5"}, None, None, None),
        ({"Retry-After": "soon"}, None, None, None),
        ({"Retry-After": "1e3"}, None, None, None),
        ({"Retry-After": "nan"}, None, None, None),
        ({"Retry-After": "inf"}, None, None, None),
        ({"Retry-After": "7, 8"}, None, None, None),
        ({"Retry-After": "٣"}, None, None, None),  # a non-ASCII digit
        ({"Retry-After": "1_000"}, None, None, None),
        ({"Retry-After": "9" * 400}, None, None, None),
        ({"Retry-After": "Wed, 99 Foo 99999 99:99:99 GMT"}, None, None, None),
        ({"x-ms-retry-after-ms": "-1"}, None, None, None),
        ({"Retry-After": "7"}, math.nan, 7.0, None),
    ],
)
def test_retry_after(
    headers: Mapping[str, Any], now: float | None, retry_after: float | None, retry_at: float | None
) -> None:
    err = must(translate(429, headers, now=now))
    assert err.code == 429000
    assert err.retry_after == retry_after
    assert err.retry_at == retry_at


def test_retry_after_applies_to_any_error_and_is_kept_raw_in_native() -> None:
    err = must(translate(503, {"Retry-After": "12"}, top_level(503003)))
    assert (err.code, err.retry_after) == (503003, 12.0)
    assert err.native["headers"]["retry-after"] == "12"
    assert "(retry after 12s)" in str(err)


def test_now_must_be_a_number() -> None:
    with pytest.raises(TypeError, match="now"):
        translate(429, {"Retry-After": "7"}, now="later")  # type: ignore[arg-type]


# --- statuses ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", range(100, 600))
def test_every_status_has_a_defined_outcome(status: int) -> None:
    err = translate(status, {"iothub-errorcode": "nonsense"}, "<html>Bad gateway</html>")
    if status < 300:
        assert err is None
        assert translate(status, None, top_level(404103)) is None
        return
    err = must(err)
    assert err.code == status * 1000
    assert err.code // 1000 == status
    assert err.exact is False
    assert err.http_status == status


@pytest.mark.parametrize(
    ("status", "code"), [(413, 413000), (502, 502000), (504, 504000), (429, 429000), (449, 449000), (520, 520000)]
)
def test_bare_status_is_its_family(status: int, code: int) -> None:
    err = must(translate(status))
    assert (err.code, err.exact, err.http_status) == (code, False, status)


@pytest.mark.parametrize("bad", [99, 600, -1, 0, 1000, True, False, None, "404", 404.0, b"404", [404]])
def test_invalid_status_is_a_value_error_naming_it(bad: Any) -> None:
    with pytest.raises(ValueError, match=repr(bad).replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        translate(bad)


def test_int_subclass_status_is_accepted() -> None:
    assert must(translate(http.HTTPStatus.TOO_MANY_REQUESTS)).code == 429000


# --- hostile and broken bodies -----------------------------------------------------------------------------


def test_huge_body_gives_the_status_family() -> None:
    err = must(translate(500, None, "x" * (10 * 1024 * 1024)))
    assert (err.code, err.exact) == (500000, False)
    assert len(err.native["body_excerpt"]) == 200
    assert must(translate(413, None, b"{" * (10 * 1024 * 1024))).code == 413000


def test_huge_body_with_a_code_up_front_is_still_read() -> None:
    body = '{"errorCode":404103,"message":"' + "x" * (10 * 1024 * 1024) + '"}'
    err = must(translate(404, None, body))
    assert (err.code, err.exact) == (404103, True)
    assert len(err.native["body_excerpt"]) == 200


def test_only_the_first_64_kib_is_read() -> None:
    body = " " * BODY_LIMIT + top_level(404103)
    assert must(translate(404, None, body)).code == 404000
    assert must(translate(404, None, body[-BODY_LIMIT:])).code == 404103


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ('{"errorCode": 404103, "message": "trunc', 404103),
        ('{"Message":"{\\"errorCode\\":404103,\\"trackingId\\":\\"95ae', 404103),
        ('{"Message":"{\\"errorCode\\":\\"412002\\", broken}"}', 412002),  # inner JSON broken, outer fine
        ("ErrorCode:DeviceNotFound;plain text body", 404001),
        ("errorCode = 429001", 429001),
        ('{"errorCode": 4041030', 404000),  # seven digits is no code
        ('{"errorCode": 123456', 404000),
        ("{{{{", 404000),
        ("[" * 100_000, 404000),
        ('{"a":' * 50_000, 404000),
        ("<html><body>502 Bad Gateway</body></html>", 404000),
        ("errorCode:" * 6000, 404000),
        ('"errorCode"' + " " * 60_000 + ":404103", 404000),
        ("", 404000),
        ("null", 404000),
        ('""', 404000),
        ('"   "', 404000),
        ('{"Message": ""}', 404000),
        ('{"Message": "   "}', 404000),
        ('{"Message": "{"}', 404000),
        ("[1, 2]", 404000),
        ('{"errorCode": {"nested": 1}}', 404000),
        (b"\xff\xfe\x00{\x00", 404000),
        (b'\xff\xfe{"errorCode":404103}', 404103),  # not JSON once decoded: the scan still finds it
        (b'{"Message":"ErrorCode:DeviceNotOnline;caf\xe9 \xc3"}', 404103),  # invalid UTF-8 inside JSON
    ],
)
def test_broken_bodies(body: str | bytes, code: int) -> None:
    err = must(translate(404, None, body))
    assert err.code == code
    assert len(err.native.get("body_excerpt", "")) <= 200


def test_non_utf8_bytes_are_replaced_not_raised() -> None:
    err = must(translate(404, None, b'{"Message":"ErrorCode:DeviceNotFound;caf\xe9"}'))
    assert err.code == 404001
    assert err.message == "caf\ufffd"


def test_long_message_is_trimmed() -> None:
    err = must(translate(404, None, top_level(404103, "y" * 5000)))
    assert err.message == "y" * 500


def test_native_holds_facts_not_the_whole_body() -> None:
    headers = {
        "Retry-After": "7",
        "iothub-errorcode": "DeviceNotOnline",
        "x-ms-substatus": "3",
        "Content-Type": "application/json",
        "Authorization": "SharedAccessSignature sr=secret",
    }
    body = top_level(404103, "z" * 1000)
    err = must(translate(404, headers, body))
    assert err.native["status"] == 404
    assert err.native["headers"] == {"retry-after": "7", "iothub-errorcode": "DeviceNotOnline", "x-ms-substatus": "3"}
    assert err.native["body_excerpt"] == body[:200]
    assert err.native["body_error_code"] == 404103
    json.dumps(err.to_dict())
    assert pickle.loads(pickle.dumps(err)).to_dict() == err.to_dict()


class _Exploding(Mapping[str, Any]):
    def __getitem__(self, key: str) -> Any:
        raise RuntimeError("boom")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("boom")

    def __len__(self) -> int:
        return 3


def _cyclic() -> dict[str, Any]:
    body: dict[str, Any] = {"trackingId": "t"}
    body["Message"] = body
    return body


@pytest.mark.parametrize(
    "body",
    [
        _Exploding(),
        _cyclic(),
        {"errorCode": object(), "Message": object(), "trackingId": object()},
        {"errorCode": 10**5000, "trackingId": 10**5000},
        {"errorCode": float("nan"), "message": float("inf")},
        {1: 2, None: 3, ("a",): 4},
        {"Message": {"Message": {"Message": {"Message": {"Message": {"errorCode": 404103}}}}}},  # beyond depth
        12345,
        [1, 2, 3],
        object(),
        memoryview(b"abcdefgh").cast("B", shape=[2, 4]),
    ],
)
def test_hostile_body_objects_give_the_status(body: Any) -> None:
    err = must(translate(404, None, body))
    assert (err.code, err.exact) == (404000, False)
    json.dumps(err.to_dict())


def test_nesting_within_the_depth_limit_is_followed() -> None:
    body = {"Message": {"Message": {"errorCode": 404103}}}
    assert must(translate(404, None, body)).code == 404103


class _ExplodingItems:
    def items(self) -> Any:
        raise RuntimeError("boom")


def _half_good() -> Iterator[Any]:
    yield ("Retry-After", "4")
    raise RuntimeError("stream broke")


@pytest.mark.parametrize(
    ("headers", "retry_after"),
    [
        (5, None),
        ("Retry-After: 7", None),
        (b"Retry-After: 7", None),
        ([1, 2, 3], None),
        ([("Retry-After",), ("a", "b", "c"), "ab", None], None),
        ({1: 2, None: "x", "Retry-After": None}, None),
        ({"Retry-After": object()}, None),
        ({"Retry-After": ["7"]}, None),
        (_ExplodingItems(), None),
        (_Exploding(), None),
        (_half_good(), 4.0),  # what was read before the failure still counts
        (itertools.repeat(("Retry-After", "3")), 3.0),  # endless: bounded by HEADER_LIMIT
        (itertools.chain(itertools.repeat(("x", "y"), 5000), [("Retry-After", "3")]), None),  # past the limit
        ([("Retry-After", "1"), ("retry-after", "2")], 1.0),
        ({"Retry-After": "7" * 5000}, None),
    ],
)
def test_garbage_headers_never_crash(headers: Any, retry_after: float | None) -> None:
    err = must(translate(429, headers))
    assert err.code == 429000
    assert err.retry_after == retry_after
    json.dumps(err.to_dict())


def test_import_does_not_pull_in_transport_libraries() -> None:
    code = (
        "import sys, adapters.http; bad = {'aiohttp', 'paho', 'proton'} & {m.split('.')[0] for m in sys.modules}; "
        "sys.exit(sorted(bad) or 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# --- property tests --------------------------------------------------------------------------------------

HEADER_NAMES = st.sampled_from(
    [
        "Retry-After",
        "retry-after",
        "x-ms-retry-after-ms",
        "retry-after-ms",
        "iothub-errorcode",
        "IoTHub-ErrorCode",
        "x-ms-substatus",
        "Date",
        "iothub-trackingid",
        "x-ms-request-id",
        "Content-Type",
    ]
) | st.text(max_size=20)
HEADER_VALUES = (
    st.text(max_size=40)
    | st.binary(max_size=40)
    | st.integers()
    | st.floats()
    | st.none()
    | st.sampled_from(["7", "0", "-1", "1.5", DATE, LATER, "DeviceNotFound", "404103", "103", "1", "999"])
)
HEADERS = (
    st.none()
    | st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=8)
    | st.lists(st.tuples(HEADER_NAMES | st.binary(max_size=12), HEADER_VALUES), max_size=8)
    | st.lists(st.one_of(st.integers(), st.text(max_size=3), st.tuples(st.text(max_size=3))), max_size=4)
    | st.integers()
    | st.text(max_size=10)
)
KEYS = st.sampled_from(["errorCode", "ErrorCode", "message", "Message", "trackingId", "ExceptionMessage"])
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=30)
    | st.sampled_from([404103, "404103", 999999, "ErrorCode:DeviceNotFound;x", f"Tracking ID:{TRACKING}"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(KEYS | st.text(max_size=10), children, max_size=4)
        | children.map(json.dumps)
    ),  # a nested value as a JSON string: double escaping
    max_leaves=20,
)
CODES = st.sampled_from(HTTP_ROWS)
BODIES = (
    st.none()
    | st.binary(max_size=300)
    | st.text(max_size=300)
    | JSON.map(json.dumps)
    | JSON.map(lambda v: json.dumps(v)[: len(json.dumps(v)) // 2])  # truncated
    | JSON.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(KEYS | st.text(max_size=10), JSON, max_size=5)
    | st.builds(lambda s: f'{{"Message":"ErrorCode:{s};x"}}', st.text(max_size=20))
    | st.builds(lambda form, row: FORMS[form](row), st.sampled_from(sorted(FORMS)), CODES)
)
STATUSES = st.integers(min_value=-5, max_value=705) | st.integers() | st.booleans() | st.floats() | st.text(max_size=4)


def check(err: IoTHubError | None, status: int) -> None:
    """What every answer must satisfy, whatever the input."""
    if status < 300:
        assert err is None
        return
    err = must(err)
    assert 300_000 <= err.code <= 599_999
    info = lookup(err.code)
    assert info.code == err.code
    if err.exact:
        assert info.known
    assert err.retry_after is None or (math.isfinite(err.retry_after) and err.retry_after >= 0)
    assert err.retry_at is None or math.isfinite(err.retry_at)
    assert len(err.message) <= 500 or err.message == info.description
    assert len(err.native.get("body_excerpt", "")) <= 200
    assert err.tracking_id is None or 0 < len(err.tracking_id) <= 256
    json.dumps(err.to_dict())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(status=STATUSES, headers=HEADERS, body=BODIES, now=st.none() | st.floats() | st.integers())
def test_anything_gives_an_error_none_or_the_documented_value_error(
    status: Any, headers: Any, body: Any, now: Any
) -> None:
    valid = isinstance(status, int) and not isinstance(status, bool) and 100 <= status <= 599
    if not valid:
        with pytest.raises(ValueError, match="HTTP status"):
            translate(status, headers, body, now=now)
        return
    check(translate(status, headers, body, now=now), status)


@settings(max_examples=300, deadline=None)
@given(status=st.integers(min_value=300, max_value=599), headers=HEADERS)
def test_without_a_body_or_code_header_the_status_decides(status: int, headers: Any) -> None:
    err = must(translate(status, headers))
    check(err, status)
    if err.code // 1000 != status:  # only a header could have said otherwise
        assert isinstance(headers, (dict, list))


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(min_value=300, max_value=599), headers=HEADERS, form=st.sampled_from(sorted(FORMS)), row=CODES
)
def test_a_well_formed_body_code_always_wins(status: int, headers: Any, form: str, row: CodeInfo) -> None:
    err = must(translate(status, headers, FORMS[form](row)))
    assert (err.code, err.exact) == (row.code, True)


@pytest.mark.parametrize("now", [math.inf, -math.inf, math.nan, 10**400])
def test_an_unusable_now_counts_as_absent(now: float) -> None:
    err = must(translate(429, {"Retry-After": LATER, "Date": DATE}, now=now))
    assert (err.retry_after, err.retry_at) == (30.0, DATE_TS + 30)
