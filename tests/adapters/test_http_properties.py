"""Headers both ways, never trusted: app properties out (hostile names and values refused up front), and
the hub's C2D answer in (a hostile header is a ProtocolViolation or ignored, never a crash).

No socket is needed: an unconnected transport validates first, so every outcome is either
ArgumentInvalid (refused, never retried) or NotConnected (valid, and nothing went out).
"""

from __future__ import annotations

import asyncio
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from adapters.http.transport import HttpTransport, _c2d_message
from gateway.errors import IoTHubError
from gateway.transport import Message

DEVICE = "HostName=hub.test;DeviceId=d1;SharedAccessKey=a2V5a2V5a2V5a2V5"
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")

names = st.one_of(st.text(max_size=20), st.sampled_from(["$.mid", "$.ct", "$", "", "temp", "a b", "x\r\ny", "ü"]))
values = st.one_of(st.text(max_size=20), st.sampled_from(["21", "a\r\nInjected: yes", "\0", "ü", "€"]))


def outcome(props: dict[str, str]) -> int:
    transport = HttpTransport(DEVICE, ssl=None)  # never connected: a valid message ends in NotConnected

    async def run() -> int:
        try:
            await asyncio.wait_for(transport.send(Message("m1", "d1", b"x", props)), 5)
        except IoTHubError as err:
            return err.code
        raise AssertionError("an unconnected transport cannot send")

    return asyncio.run(run())


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(names, values, max_size=4))
def test_every_property_set_is_refused_or_valid_as_headers(props: dict[str, str]) -> None:
    code = outcome(props)
    valid = all(
        name and not name.startswith("$") and HEADER_NAME.fullmatch("iothub-app-" + name)
        and not any(c in value for c in "\r\n\0") and all(ord(c) < 256 for c in value)
        for name, value in props.items()
    )
    assert code == (503904 if valid else 400004), props


def test_reserved_names_are_refused_even_when_they_are_valid_header_names() -> None:
    assert HEADER_NAME.fullmatch("iothub-app-$.mid")  # HTTP itself would carry it
    assert outcome({"$.mid": "forged"}) == 400004
    assert outcome({"temp": "21"}) == 503904


# --- a received cloud-to-device message: the hub's headers, parsed without trusting them ----------------

latin1 = st.text(st.characters(max_codepoint=255), max_size=30)
hostile = st.one_of(latin1, st.sampled_from(["²", "٣", "9" * 5000, " 7 ", "-1", "", '""', '"abc"']))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["ETag", "iothub-deliverycount", "iothub-messageid", "iothub-correlationid",
                                        "iothub-app-temp", "IOTHUB-APP-Unit", "Content-Type"]), hostile),
       st.binary(max_size=50))
def test_any_c2d_answer_is_a_message_or_a_protocol_violation(headers: dict[str, str], body: bytes) -> None:
    try:
        msg = _c2d_message("d1", CIMultiDict(headers), body)
    except IoTHubError as err:
        assert err.code == 400901 and not err.exact  # ProtocolViolation: no lock to settle it with
        assert not headers.get("ETag", "").strip().strip('"')
        return
    assert msg.lock_token and msg.body == body and msg.device_id == "d1"
    assert 0 <= msg.delivery_count < 10**9
    assert set(msg.properties) <= {"temp", "Unit"}


def test_delivery_count_is_read_when_it_is_a_plain_number() -> None:
    msg = _c2d_message("d1", CIMultiDict({"ETag": '"lock"', "iothub-deliverycount": "3"}), b"")
    assert (msg.lock_token, msg.delivery_count) == ("lock", 3)
    for bad in ("²", "9" * 5000, "x"):
        assert _c2d_message("d1", CIMultiDict({"ETag": "l", "iothub-deliverycount": bad}), b"").delivery_count == 0
