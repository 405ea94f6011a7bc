"""adapters.amqp: conditions, info refinements, CBS answers, render round-trips and hostile input."""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proton import Condition, Data, symbol
from proton.handlers import MessagingHandler
from proton.reactor import Container

from adapters.amqp import CONDITIONS, RenderedCondition, render, translate, translate_cbs
from gateway.codes import all_codes, lookup
from gateway.errors import (
    ConnectionLostError,
    CredentialsExpiredError,
    FatalError,
    IdentityConflictError,
    IoTHubError,
    QuotaExceededError,
    RequestError,
    ServerError,
    ThrottledError,
    UnauthorizedError,
)

# The decided table, written out with numbers so a wrong name in the module is caught here.
TABLE: list[tuple[str, int, bool]] = [
    ("amqp:internal-error", 500001, False),
    ("amqp:not-found", 404001, False),
    ("amqp:unauthorized-access", 401003, False),
    ("amqp:decode-error", 400006, False),
    ("amqp:resource-limit-exceeded", 403002, False),
    ("amqp:not-allowed", 400003, False),
    ("amqp:invalid-field", 400004, False),
    ("amqp:not-implemented", 400003, False),
    ("amqp:resource-locked", 423000, False),  # transient (C#, Java): retry, never an identity conflict
    ("amqp:resource-deleted", 404001, False),
    ("amqp:precondition-failed", 412001, False),
    ("amqp:illegal-state", 400003, False),
    ("amqp:frame-size-too-small", 400901, False),
    ("amqp:connection:forced", 404104, False),
    ("amqp:connection:framing-error", 400901, False),
    ("amqp:connection:redirect", 503906, False),
    ("amqp:session:window-violation", 400901, False),
    ("amqp:session:errant-link", 400901, False),
    ("amqp:session:handle-in-use", 400901, False),
    ("amqp:session:unattached-handle", 400901, False),
    ("amqp:link:detach-forced", 404104, False),
    ("amqp:link:transfer-limit-exceeded", 400901, False),
    ("amqp:link:message-size-exceeded", 413001, True),
    ("amqp:link:redirect", 503906, False),
    ("amqp:link:stolen", 409002, True),
    ("amqp:transaction:unknown-id", 400004, False),
    ("amqp:transaction:rollback", 500001, False),
    ("amqp:transaction:timeout", 500008, False),
    ("com.microsoft:device-container-throttled", 429001, True),
    ("com.microsoft:message-lock-lost", 412002, True),
    ("com.microsoft:link-creation-conflict", 409002, True),
    ("com.microsoft:quota-exceeded", 403002, True),
    ("com.microsoft:timeout", 500008, False),
    ("com.microsoft:argument-error", 400004, True),
    ("com.microsoft:argument-out-of-range", 400004, False),
    ("com.microsoft:iot-hub-suspended", 403001, True),
    ("com.microsoft:iot-hub-not-found-error", 401001, True),
    ("com.microsoft:device-already-exists", 409001, True),
    ("com.microsoft:precondition-failed", 412001, True),
]


# --- the condition table -----------------------------------------------------------------------------


@pytest.mark.parametrize(("condition", "code", "exact"), TABLE)
def test_condition_table(condition: str, code: int, exact: bool) -> None:
    err = translate(condition)
    assert (err.code, err.exact, err.transport) == (code, exact, "amqp")
    assert err.native["condition"] == condition
    assert condition in str(err)


def test_exported_table_is_the_decided_one() -> None:
    assert dict(CONDITIONS) == {cond: (code, exact) for cond, code, exact in TABLE}


@pytest.mark.parametrize(("condition", "code", "exact"), TABLE)
def test_condition_as_symbol_and_as_proton_condition(condition: str, code: int, exact: bool) -> None:
    assert translate(symbol(condition)).code == code
    err = translate(Condition(symbol(condition), "text from the peer", {symbol("status-code"): code // 1000}))
    assert (err.code, err.exact) == (code, exact)
    assert err.native["description"] == "text from the peer"


@pytest.mark.parametrize("spelling", ["AMQP:LINK:STOLEN", "  amqp:link:stolen\n", "\tAmqp:Link:Stolen "])
def test_condition_is_case_and_whitespace_insensitive(spelling: str) -> None:
    err = translate(spelling)
    assert (err.code, err.exact) == (409002, True)


def test_bytes_condition_as_uamqp_spells_it() -> None:
    assert translate(b"com.microsoft:device-container-throttled").code == 429001


@pytest.mark.parametrize(
    ("condition", "cls", "retryable"),
    [
        ("amqp:link:stolen", IdentityConflictError, False),
        ("amqp:unauthorized-access", CredentialsExpiredError, True),
        ("com.microsoft:device-container-throttled", ThrottledError, True),
        ("com.microsoft:quota-exceeded", QuotaExceededError, True),
        ("amqp:connection:forced", ConnectionLostError, True),
        ("amqp:internal-error", ServerError, True),
        ("amqp:link:message-size-exceeded", RequestError, False),
        ("com.microsoft:iot-hub-suspended", FatalError, False),
    ],
)
def test_conditions_land_in_the_right_family(condition: str, cls: type[IoTHubError], retryable: bool) -> None:
    err = translate(condition)
    assert isinstance(err, cls)
    assert err.retryable is retryable


@pytest.mark.parametrize("condition", [None, "", "   ", symbol("")])
def test_no_condition_means_closed_remotely_inexact(condition: str | None) -> None:
    err = translate(condition)
    assert (err.code, err.exact) == (404104, False)
    assert isinstance(err, ConnectionLostError)
    assert err.native["condition"] is None


@pytest.mark.parametrize("condition", ["amqp:something-new", "x", "com.microsoft:not-yet-invented", "a" * 5000])
def test_unknown_condition_is_unclassified_inexact(condition: str) -> None:
    err = translate(condition)
    assert (err.code, err.name, err.exact) == (500901, "UnclassifiedTransportError", False)
    assert err.retryable
    assert len(err.native["condition"]) <= 256


def test_unknown_condition_takes_the_family_of_its_status() -> None:
    assert translate("amqp:something-new", None, {"status-code": 503}).code == 503000
    assert translate("amqp:something-new", None, {"status-code": 404}).code == 404000
    assert translate("amqp:something-new", None, {"status-code": 500}).code == 500000


# --- proton's own (local) conditions -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "description", "code"),
    [
        ("proton.pythonio", "Connection refused to all addresses", 503901),
        ("proton:io", "Connection REFUSED", 503901),
        ("proton.pythonio", "Connection error: 113", 404104),
        ("proton:io", None, 404104),
        (
            "amqp:connection:framing-error",
            "SSL Failure: error:0A000086:SSL routines::certificate verify failed",
            401901,
        ),
        ("amqp:connection:framing-error", "SSL Failure: error:0A000410:SSL routines::handshake failure", 503905),
        ("amqp:connection:framing-error", "Expected AMQP protocol header got: HTTP/1.1", 400901),
        ("amqp:connection:framing-error", "connection aborted", 404104),
        ("amqp:resource-limit-exceeded", "local-idle-timeout expired", 404104),
        ("amqp:resource-limit-exceeded", "daily quota", 403002),
    ],
)
def test_local_faults_told_apart_by_description(condition: str, description: str | None, code: int) -> None:
    err = translate(condition, description)
    assert (err.code, err.exact) == (code, False)


def test_tls_verification_failure_is_not_retried_and_idle_timeout_does_not_park() -> None:
    verify = translate("amqp:connection:framing-error", "SSL Failure: certificate verify failed")
    assert isinstance(verify, FatalError)
    assert not verify.retryable
    idle = translate("amqp:resource-limit-exceeded", "local-idle-timeout expired")
    assert isinstance(idle, ConnectionLostError)
    assert not isinstance(idle, QuotaExceededError)


# --- info: tracking id, status-code, error-code, retry-after -------------------------------------------


def test_tracking_id_from_symbol_key() -> None:
    info = {symbol("com.microsoft:tracking-id"): "b2c1e3a4-G:7-TimeStamp:01/02/2026 10:00:00"}
    err = translate("amqp:link:detach-forced", "idle link", info)
    assert err.tracking_id == "b2c1e3a4-G:7-TimeStamp:01/02/2026 10:00:00"
    assert err.native["info"] == {"com.microsoft:tracking-id": "b2c1e3a4-G:7-TimeStamp:01/02/2026 10:00:00"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"abc", "abc"), ("  abc \n", "abc"), ("", None), (42, None), ("x" * 1000, "x" * 256)],
)
def test_tracking_id_forms(value: object, expected: str | None) -> None:
    assert translate("amqp:internal-error", None, {"com.microsoft:tracking-id": value}).tracking_id == expected


@pytest.mark.parametrize(
    ("condition", "status", "code", "exact"),
    [
        # a different family: the status's generic code, inexact
        ("amqp:resource-limit-exceeded", 429, 429000, False),
        ("amqp:link:stolen", 500, 500000, False),
        ("com.microsoft:device-container-throttled", 503, 503000, False),
        # the same family keeps the table code and its exactness
        ("amqp:resource-limit-exceeded", 403, 403002, False),
        ("amqp:link:stolen", 409, 409002, True),
        ("amqp:not-found", "404", 404001, False),
        ("amqp:not-found", " 404 ", 404001, False),
        # a six-digit status is the code itself
        ("amqp:resource-limit-exceeded", 403004, 403004, True),
        ("amqp:internal-error", "404103", 404103, True),
        ("amqp:internal-error", 500123, 500001, False),  # unlisted: refines like status 500, same family
        ("amqp:link:stolen", 429999, 429000, False),  # unlisted, another family: that family, inexact
        ("amqp:link:stolen", "500123", 500000, False),
        # not an error status, not a code: ignored
        ("amqp:link:stolen", 200, 409002, True),
        ("amqp:link:stolen", 42, 409002, True),
        ("amqp:link:stolen", 200001, 409002, True),
        ("amqp:link:stolen", 4090020, 409002, True),
        ("amqp:link:stolen", True, 409002, True),
        ("amqp:link:stolen", "4O9", 409002, True),
        ("amqp:link:stolen", "\u0665\u0660\u0660", 409002, True),  # Arabic-Indic digits: int() reads them
        ("amqp:link:stolen", "5\u00b200", 409002, True),  # a superscript: isdigit() but not int()
        ("amqp:link:stolen", {"nested": 500}, 409002, True),
        pytest.param("amqp:link:stolen", 10**5000, 409002, True, id="int-too-long-to-print"),
    ],
)
def test_status_code_refines(condition: str, status: object, code: int, exact: bool) -> None:
    err = translate(condition, None, {symbol("status-code"): status})
    assert (err.code, err.exact) == (code, exact)


def test_status_code_on_no_condition() -> None:
    assert translate(None, None, {"status-code": 500}).code == 500000
    assert translate(None, None, {"status-code": 404}).code == 404104


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("com.microsoft:error-code", 404103),
        ("error-code", "404103"),
        ("errorCode", 404103),
        (symbol("com.microsoft:error-code"), "DeviceNotOnline"),
        ("Error-Code", b"404103"),
    ],
)
def test_error_code_in_info_is_exact(key: str, value: object) -> None:
    err = translate("amqp:not-found", None, {key: value})
    assert (err.code, err.exact) == (404103, True)


def test_error_code_wins_over_status_and_description() -> None:
    info = {"status-code": 429002, "error-code": 429005}
    err = translate("amqp:internal-error", "ErrorCode:ThrottlingBacklogTimeout;", info)
    assert err.code == 429005
    assert translate("amqp:internal-error", "ErrorCode:ThrottlingBacklogTimeout;", {"status-code": 429002}).code == (
        429002
    )


@pytest.mark.parametrize("garbage", ["nope", 12, 200001, "", None, ["404103"], True])
def test_error_code_garbage_is_ignored(garbage: object) -> None:
    err = translate("amqp:link:stolen", None, {"error-code": garbage})
    assert (err.code, err.exact) == (409002, True)


@pytest.mark.parametrize(
    ("description", "code"),
    [
        ("ErrorCode:DeviceNotOnline;The device is not online", 404103),
        ("ErrorCode:404103;The device is not online", 404103),
        ('{"errorCode":404103,"trackingId":"abc","message":"offline"}', 404103),
        ('{"errorCode":"404103"}', 404103),
        ('{\\"errorCode\\":404103,\\"trackingId\\":\\"abc\\"}', 404103),
        ("errorcode = throttled; alias names work too", 429001),
        ("Error code: Nope; ErrorCode:IoTHubUnauthorized", 401003),
    ],
)
def test_error_code_in_description_is_exact(description: str, code: int) -> None:
    err = translate("amqp:internal-error", description, {"status-code": 500})
    assert (err.code, err.exact) == (code, True)


@pytest.mark.parametrize(
    "description",
    [
        "ErrorCode:NoSuchName;x",
        "ErrorCode:4041030",
        "ErrorCode:40410",
        '{"errorCode":0}',
        "errors: code 404103",
        "x" * 3000 + "ErrorCode:DeviceNotOnline",
    ],
)
def test_description_without_a_usable_code_keeps_the_table(description: str) -> None:
    err = translate("amqp:link:stolen", description)
    assert (err.code, err.exact) == (409002, True)


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"retry-after": 7}, 7.0),
        ({"com.microsoft:retry-after": "2.5"}, 2.5),
        ({"retry-after-ms": 1500}, 1.5),
        ({"retry-after": 9, "retry-after-ms": 1500}, 1.5),
        ({"retry-after": "soon"}, None),
        ({"retry-after": -3}, None),
        ({"retry-after": float("nan")}, None),
        ({"retry-after": 10**400}, None),
        ({"retry-after": True}, None),
        ({}, None),
    ],
)
def test_retry_after(info: dict[str, object], expected: float | None) -> None:
    err = translate("com.microsoft:device-container-throttled", None, info)
    assert err.retry_after == expected


def test_huge_retry_after_is_capped() -> None:
    err = translate("com.microsoft:device-container-throttled", None, {"retry-after": "1e999"})
    assert err.retry_after == 366 * 86400.0


# --- Condition-like objects ------------------------------------------------------------------------------


def test_condition_object_supplies_description_and_info_unless_given() -> None:
    cond = Condition("amqp:resource-limit-exceeded", "throttled", {symbol("status-code"): 429})
    assert translate(cond).code == 429000
    assert translate(cond, None, {}).code == 403002  # an explicit (empty) info replaces the object's
    overridden = translate(cond, "ErrorCode:DeviceThrottlingLimitExceeded;")
    assert (overridden.code, overridden.exact) == (429005, True)


class _DuckCondition:
    def __init__(self, name: object, description: object = None, info: object = None) -> None:
        self.name = name
        self.description = description
        self.info = info


def test_duck_typed_condition() -> None:
    err = translate(_DuckCondition("amqp:link:stolen", "taken", {"com.microsoft:tracking-id": "t1"}))  # type: ignore[arg-type]
    assert (err.code, err.tracking_id, err.native["description"]) == (409002, "t1", "taken")
    assert translate(_DuckCondition(None)).code == 404104  # type: ignore[arg-type]
    assert translate(_DuckCondition(b"amqp:link:stolen")).code == 409002  # type: ignore[arg-type]


class _NameOnly:
    name = "com.microsoft:timeout"


class _HostileProperties:
    @property
    def name(self) -> str:
        return "amqp:not-found"

    @property
    def description(self) -> str:
        raise RuntimeError("boom")

    @property
    def info(self) -> object:
        raise RuntimeError("boom")


def test_condition_object_with_partial_or_hostile_attributes() -> None:
    assert translate(_NameOnly()).code == 500008  # type: ignore[arg-type]
    assert translate(_HostileProperties()).code == 404001  # type: ignore[arg-type]


class _RaisingName:
    @property
    def name(self) -> str:
        raise RuntimeError("boom")


@pytest.mark.parametrize(
    "garbage",
    [42, 4.5, ["amqp:link:stolen"], {"name": "amqp:link:stolen"}, object(), _DuckCondition(409), _RaisingName()],
)
def test_non_condition_raises_value_error_naming_it(garbage: object) -> None:
    with pytest.raises(ValueError, match="condition") as caught:
        translate(garbage)  # type: ignore[arg-type]
    if isinstance(garbage, int):
        assert "42" in str(caught.value)


# --- native facts, serialization ------------------------------------------------------------------------


def test_native_is_bounded_and_json_safe() -> None:
    info: dict[Any, Any] = {
        symbol("status-code"): 409,
        symbol("com.microsoft:tracking-id"): "t",
        7: [1, 2, {"x": b"y"}],
    }
    info.update({f"k{i}": "v" * 1000 for i in range(100)})
    err = translate("amqp:link:stolen", "d" * 5000, info)
    assert len(err.native["description"]) == 500
    assert len(err.native["info"]) == 32
    assert err.native["info"]["status-code"] == "409"
    assert all(isinstance(k, str) and isinstance(v, str) and len(v) <= 210 for k, v in err.native["info"].items())
    json.dumps(err.to_dict())
    clone = pickle.loads(pickle.dumps(err))
    assert (type(clone), clone.code, clone.tracking_id, clone.exact) == (type(err), 409002, "t", True)


def test_non_mapping_info_is_kept_as_text_and_ignored() -> None:
    err = translate("amqp:link:stolen", None, [("status-code", 500)])  # type: ignore[arg-type]
    assert (err.code, err.exact) == (409002, True)
    assert isinstance(err.native["info"], str)


class _HostileMapping(Mapping[str, object]):
    def __getitem__(self, key: str) -> object:
        raise RuntimeError("boom")

    def __iter__(self) -> Iterator[str]:
        yield "status-code"
        raise RuntimeError("boom")

    def __len__(self) -> int:
        return 1

    def items(self) -> Any:
        yield ("status-code", 429)
        raise RuntimeError("boom")


class _BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("boom")


def test_hostile_info_never_crashes() -> None:
    err = translate("amqp:resource-limit-exceeded", None, _HostileMapping())
    assert err.code == 429000  # what was read before the mapping blew up still counts
    err = translate("amqp:internal-error", _BadRepr(), {_BadRepr(): _BadRepr()})  # type: ignore[arg-type]
    assert err.code == 500001
    json.dumps(err.to_dict())


# --- CBS put-token answers --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [100, 200, 202, 204, 299, "200"])
def test_cbs_success_is_none(status: int | str) -> None:
    assert translate_cbs(status, "OK") is None


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (401, 401003, CredentialsExpiredError),
        (403, 401002, FatalError),
        (404, 404001, FatalError),
        (429, 429000, ThrottledError),
        (500, 500000, ServerError),
        (503, 503000, ServerError),
        (302, 302000, RequestError),
        (400, 400000, RequestError),
        (420, 420000, RequestError),
        ("401", 401003, CredentialsExpiredError),
    ],
)
def test_cbs_table(status: int | str, code: int, cls: type[IoTHubError]) -> None:
    err = translate_cbs(status, "denied")
    assert err is not None
    assert (err.code, err.exact, err.transport) == (code, False, "amqp")
    assert isinstance(err, cls)
    assert err.native["cbs_status"] == int(status)


def test_cbs_403_is_a_permanent_unauthorized() -> None:
    err = translate_cbs(403)
    assert isinstance(err, UnauthorizedError)
    assert not err.retryable


def test_cbs_finer_facts() -> None:
    err = translate_cbs(401, "ErrorCode:IotHubUnauthorizedAccess;no rights", {"com.microsoft:tracking-id": "cbs-1"})
    assert err is not None
    assert (err.code, err.exact, err.tracking_id) == (401002, True, "cbs-1")
    err = translate_cbs(429, None, {"retry-after": 3, "error-code": 429001, "status-code": 503})
    assert err is not None
    assert (err.code, err.exact, err.retry_after) == (429001, True, 3.0)


@pytest.mark.parametrize(
    "garbage", [0, 99, 600, -401, 10**9, True, 401.0, None, "abc", "4O1", "\u0664\u0660\u0661", "401000", [401]]
)
def test_cbs_rejects_non_status(garbage: object) -> None:
    with pytest.raises(ValueError, match="CBS status") as caught:
        translate_cbs(garbage)  # type: ignore[arg-type]
    assert repr(garbage)[:20] in str(caught.value)


# --- render: the emulator's view of the table -------------------------------------------------------------


def test_render_round_trips_every_catalog_code() -> None:
    for row in all_codes():
        forms = render(row.code)
        assert forms, row.name
        for form in forms:
            err = translate(*form)
            assert (err.code, err.exact) == (row.code, True), (row.name, form)


def _through_the_wire(form: RenderedCondition) -> Condition:
    """Encode the info map as proton would on the wire (symbol keys) and decode it again."""
    data = Data()
    data.put_object({symbol(k): v for k, v in form.info.items()})
    data.rewind()
    data.next()
    return Condition(symbol(form.condition), form.description, data.get_object())


def test_render_round_trips_through_proton_encoding() -> None:
    for row in all_codes():
        for form in render(row.code, tracking_id="trk-1", retry_after=4):
            err = translate(_through_the_wire(form))
            assert (err.code, err.exact, err.tracking_id, err.retry_after) == (row.code, True, "trk-1", 4.0)


def test_render_prefers_exact_conditions_then_the_generic_form() -> None:
    exact_by_code: dict[int, set[str]] = {}
    for cond, code, exact in TABLE:
        if exact:
            exact_by_code.setdefault(code, set()).add(cond)
    for row in all_codes():
        forms = render(row.code)
        expected = exact_by_code.get(row.code, set())
        assert len(forms) == len(expected) + 1
        assert {f.condition for f in forms[: len(expected)]} == expected
        generic = forms[-1]
        assert generic.description.startswith(f"ErrorCode:{row.name};")
        assert generic.info == {"status-code": row.code // 1000}
        # never a condition a client library acts on (redirect, refusal) or one of proton's own
        assert lookup(CONDITIONS[generic.condition][0]).origin == "iothub", (row.name, generic.condition)
    assert render(503001)[-1].condition == "amqp:internal-error"  # not amqp:connection:redirect


def test_render_generic_form_alone_reads_as_the_right_family() -> None:
    # Stripped of the description, a generic form still reads as a code of the same status family
    # wherever the table has an IoT Hub condition for that family.
    for status, cond in [(429, "com.microsoft:device-container-throttled"), (404, "amqp:not-found"),
                         (401, "amqp:unauthorized-access"), (500, "amqp:internal-error")]:
        form = render(status * 1000)[-1]
        assert form.condition == cond
        assert translate(form.condition, None, form.info).code // 1000 == status


def test_render_alias_and_unlisted_codes() -> None:
    assert translate(*render(404102)[0]).code == 404103  # an alias renders its canonical code
    err = translate(*render(500123)[0])  # an unlisted code is its family's: rendered and read back as such
    assert (err.code, err.exact) == (500000, True)
    assert render(lookup(429001))[0].condition == "com.microsoft:device-container-throttled"
    with pytest.raises(ValueError, match="six-digit"):
        render(42)


# --- real proton objects off a loopback connection ------------------------------------------------------


_ADDRESS = "devices/d1/messages/devicebound"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _StolenLinkServer(MessagingHandler):  # type: ignore[misc]
    """Closes the client's link with amqp:link:stolen, as IoT Hub does for a second link."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.seen: list[Any] = []
        self.closed_links: set[int] = set()

    def on_start(self, event: Any) -> None:
        self.acceptor = event.container.listen(f"127.0.0.1:{self.port}")
        event.container.connect(
            f"amqp://127.0.0.1:{self.port}", handler=_Client(self), reconnect=False, allowed_mechs="ANONYMOUS"
        )
        self.watchdog = event.container.schedule(5.0, _Watchdog())

    def on_link_opened(self, event: Any) -> None:
        link = event.link
        if id(link) in self.closed_links or link.remote_source.address != _ADDRESS:
            return
        self.closed_links.add(id(link))
        link.condition = Condition(
            "amqp:link:stolen",
            "another link attached",
            {symbol("status-code"): 409, symbol("com.microsoft:tracking-id"): "wire-1"},
        )
        link.close()


class _Client(MessagingHandler):  # type: ignore[misc]
    def __init__(self, server: _StolenLinkServer) -> None:
        super().__init__()
        self.server = server

    def on_connection_opened(self, event: Any) -> None:
        event.container.create_receiver(event.connection, _ADDRESS)

    def on_link_error(self, event: Any) -> None:
        self.server.seen.append(event.link.remote_condition)
        event.connection.close()
        self.server.acceptor.close()
        self.server.watchdog.cancel()


class _Watchdog:
    def on_timer_task(self, event: Any) -> None:
        event.container.stop()


def test_condition_read_off_a_real_proton_link() -> None:
    server = _StolenLinkServer(_free_port())
    Container(server).run()
    assert len(server.seen) == 1
    err = translate(server.seen[0])
    assert (err.code, err.exact, err.tracking_id) == (409002, True, "wire-1")
    assert isinstance(err, IdentityConflictError)


# --- import cost ---------------------------------------------------------------------------------------


def test_import_does_not_pull_in_proton() -> None:
    code = (
        "import sys, adapters.amqp; from adapters.amqp.translate import translate;"
        "assert not [m for m in sys.modules if m.split('.')[0] in {'proton', 'cproton', 'paho', 'aiohttp'}]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- hostile input (hypothesis) -------------------------------------------------------------------------

_KEYS = ["status-code", "com.microsoft:tracking-id", "error-code", "errorCode", "retry-after", "retry-after-ms"]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=50),
    st.binary(max_size=20),
    st.sampled_from(["404103", "429", " 503 ", "ThrottlingException", "1e999", "-1"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)
_info_keys = st.one_of(
    st.sampled_from(_KEYS).map(symbol),
    st.sampled_from(_KEYS),
    st.text(max_size=30),
    st.binary(max_size=10),
    st.integers(),
)
_infos = st.one_of(
    st.none(),
    st.dictionaries(_info_keys, _values, max_size=8),
    st.lists(_scalars, max_size=3),
    st.integers(),
    st.text(max_size=20),
)
_condition_names = st.one_of(
    st.none(),
    st.text(max_size=300),
    st.binary(max_size=40),
    st.sampled_from([c for c, _, _ in TABLE] + ["proton:io", "proton.pythonio", ""]).flatmap(
        lambda c: st.sampled_from([c, c.upper(), f"  {c} "])
    ),
)
_descriptions = st.one_of(
    st.none(),
    st.text(max_size=3000),
    st.binary(max_size=100),
    st.builds(lambda pre, code, post: f"{pre}ErrorCode:{code}{post}", st.text(max_size=20),
              st.one_of(st.integers(), st.text(max_size=12), st.sampled_from(["DeviceNotOnline", "429001"])),
              st.text(max_size=20)),
)


def _check(err: IoTHubError) -> None:
    assert isinstance(err, IoTHubError)
    assert err.transport == "amqp"
    assert lookup(err.code).code // 1000 == err.code // 1000
    assert err.retry_after is None or err.retry_after >= 0
    json.dumps(err.to_dict())


@settings(max_examples=400, deadline=None)
@given(_condition_names, _descriptions, _infos)
def test_hostile_conditions_always_give_an_error(condition: Any, description: Any, info: Any) -> None:
    _check(translate(condition, description, info))


@settings(max_examples=200, deadline=None)
@given(_condition_names, _descriptions, _infos)
def test_hostile_proton_conditions(name: Any, description: Any, info: Any) -> None:
    _check(translate(Condition(name, description, info)))


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(st.integers(), st.floats(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(), st.text()))
)
def test_garbage_conditions_raise_value_error(garbage: Any) -> None:
    with pytest.raises(ValueError):
        translate(garbage)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(min_value=-10**6, max_value=10**6), st.text(max_size=8)), _descriptions, _infos)
def test_hostile_cbs(status: Any, description: Any, info: Any) -> None:
    text = status.strip() if isinstance(status, str) else None
    valid = (isinstance(status, int) and 100 <= status <= 599) or (
        text is not None and 0 < len(text) <= 6 and text.isascii() and text.isdigit() and 100 <= int(text) <= 599
    )
    if not valid:
        with pytest.raises(ValueError, match="CBS status"):
            translate_cbs(status, description, info)
        return
    err = translate_cbs(status, description, info)
    if int(status) < 300:
        assert err is None
    else:
        assert err is not None
        _check(err)


def test_resource_locked_is_a_transient_retry_not_an_identity_conflict() -> None:
    # C# treats it as a transient resource fault, Java as retryable (peer-sdks.md): never 409002.
    err = translate("amqp:resource-locked")
    assert (err.code, err.exact, err.retryable) == (423000, False, True)
    assert err.action.value == "retry" and "proxy" not in err.message
    assert translate("amqp:resource-locked", "locked by another link").message.endswith("locked by another link")
