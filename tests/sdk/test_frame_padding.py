"""The SASL shim carries proton's performatives to their full field count (azure-eventhub's pyamqp needs it)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from gateway.emulator.sasl import pad_performative


def _frame(body: bytes, channel: int = 0) -> bytes:
    return struct.pack(">IBBH", 8 + len(body), 2, 0, channel) + body


def _fields(frame: bytes) -> tuple[int, bytes, bytes]:
    """(count, elements, what follows the list) of a padded frame's list32."""
    body = frame[8:]
    assert body[3] == 0xD0
    size, count = struct.unpack(">II", body[4:12])
    return count, body[12:8 + size], body[8 + size:]


def test_open_with_three_fields_gets_ten() -> None:
    # open: container-id "c", hostname null, max-frame-size uint 512
    elements = b"\xa1\x01c" + b"\x40" + b"\x70\x00\x00\x02\x00"
    frame = _frame(b"\x00\x53\x10" + bytes([0xC0, 1 + len(elements), 3]) + elements, channel=7)
    padded = pad_performative(frame)
    assert struct.unpack(">I", padded[:4])[0] == len(padded)
    assert padded[4:8] == frame[4:8]  # data offset, type and channel kept
    count, got, rest = _fields(padded)
    assert count == 10 and got == elements + b"\x40" * 7 and rest == b""


def test_transfer_payload_follows_the_padded_list() -> None:
    elements = b"\x43" + b"\x52\x05"  # handle 0, delivery-id 5
    payload = b"\x00\x53\x75\xa0\x03abc"  # a data section
    frame = _frame(b"\x00\x53\x14" + bytes([0xC0, 1 + len(elements), 2]) + elements + payload)
    count, got, rest = _fields(pad_performative(frame))
    assert count == 11 and got.startswith(elements) and rest == payload


def test_list0_and_full_lists() -> None:
    count, got, _ = _fields(pad_performative(_frame(b"\x00\x53\x17\x45")))  # end with no fields
    assert (count, got) == (1, b"\x40")
    full = _frame(b"\x00\x53\x17" + bytes([0xC0, 2, 1, 0x40]))
    assert pad_performative(full) == full


def test_heartbeats_sasl_and_unknown_descriptors_pass_unchanged() -> None:
    heartbeat = struct.pack(">IBBH", 8, 2, 0, 0)
    sasl = struct.pack(">IBBH", 13, 2, 1, 0) + b"\x00\x53\x44\x45\x00"
    unknown = _frame(b"\x00\x53\x70\x45")
    for frame in (heartbeat, sasl, unknown):
        assert pad_performative(frame) == frame


@given(st.binary(max_size=64))
def test_hostile_bytes_never_crash(data: bytes) -> None:
    frame = _frame(data)
    out = pad_performative(frame)
    assert struct.unpack(">I", out[:4])[0] == len(out)


@given(st.integers(0, 255), st.binary(max_size=64))
def test_any_data_offset_keeps_the_frame_whole(offset: int, data: bytes) -> None:
    frame = struct.pack(">IBBH", 8 + 3 + len(data), offset, 0, 0) + b"\x00\x53\x10" + data
    out = pad_performative(frame)
    assert out == frame or (out[4:8] == frame[4:8] and struct.unpack(">I", out[:4])[0] == len(out))
