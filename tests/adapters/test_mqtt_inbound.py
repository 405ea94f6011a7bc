"""The MQTT adapter's inbound side under hostile input (hypothesis): whatever topic, payload and QoS a
peer sends, ``on_message`` never raises, the queue stays bounded, and only C2D waits for a settle.
Also the desired-patch merge the full-queue path relies on."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import paho.mqtt.client as mqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from adapters.mqtt.transport import MqttTransport, _Link, _merge_patch
from gateway.transport import C2DMessage, DesiredPatch, Inbound, MethodCall

HUB = "fuzz-hub.azure-devices.net"

topics = st.one_of(
    st.text(max_size=80),
    st.builds(lambda s: f"devices/d1/messages/devicebound/{s}", st.text(max_size=60)),
    st.builds(lambda s: f"$iothub/methods/POST/{s}", st.text(max_size=60)),
    st.builds(lambda s: f"$iothub/twin/PATCH/properties/desired/{s}", st.text(max_size=60)),
    st.builds(lambda s: f"$iothub/twin/res/{s}", st.text(max_size=60)),
)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=4))
json_doc = st.recursive(json_leaf, lambda inner: st.dictionaries(st.text("abc", max_size=2), inner, max_size=3),
                        max_leaves=8)
payloads = st.one_of(st.binary(max_size=64), json_doc.map(lambda d: json.dumps(d).encode()))


def message(topic: str, payload: bytes, qos: int, mid: int) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid=mid, topic=topic.encode("utf-8", "surrogatepass"))
    msg.payload, msg.qos = payload, qos
    return msg


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(topics, payloads, st.sampled_from([0, 1])), max_size=12))
def test_on_message_never_raises_and_stays_bounded(batch: list[tuple[str, bytes, int]]) -> None:
    async def run() -> None:
        t = MqttTransport(f"HostName={HUB};DeviceId=d1", sas_token="x", ssl=None, max_events=3)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="d1", manual_ack=True)
        link = _Link(t, client, asyncio.get_running_loop(), 1, None)
        for mid, (topic, payload, qos) in enumerate(batch, start=1):
            link._on_message(client, None, message(topic, payload, qos, mid))
        assert link.inbound <= 3 and link.events.qsize() == link.inbound
        while not link.events.empty():
            event = link.events.get_nowait()
            assert isinstance(event, Inbound)
            if event.kind == "c2d":
                assert isinstance(event.payload, C2DMessage) and event.payload.device_id == "d1"
            elif event.kind == "method":
                assert isinstance(event.payload, MethodCall)
            else:
                assert isinstance(event.payload, DesiredPatch) and isinstance(event.payload.patch, dict)
        # only QoS 1 C2D messages that were queued wait for a settle
        assert len(link.unsettled) <= 3

    asyncio.run(run())


def apply_patch(doc: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch, as the device applies a desired patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(doc) if isinstance(doc, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_patch(result.get(key), value)
    return result


patches = st.dictionaries(st.text("abc", max_size=2), json_doc, max_size=3)


@given(st.lists(patches, min_size=1, max_size=5))
def test_merged_desired_patches_apply_like_the_sequence(sequence: list[dict[str, Any]]) -> None:
    """From the state the first patch starts on (here: nothing set), the merged patch has the effect of
    the whole sequence."""
    merged: dict[str, Any] = {}
    expected: Any = {}
    for patch in sequence:
        merged = _merge_patch(merged, patch)
        expected = apply_patch(expected, patch)
    assert apply_patch({}, merged) == expected


@given(json_doc.filter(lambda d: isinstance(d, dict)), st.lists(patches, min_size=1, max_size=5))
def test_merged_object_patches_apply_like_the_sequence_on_any_document(doc: dict[str, Any],
                                                                       sequence: list[dict[str, Any]]) -> None:
    """On any document, as long as no patch turns a key into a non-object that a later patch makes an
    object again (merge patch cannot say "replace this object"), the merged patch is exact."""

    def replaced_then_object(seq: list[dict[str, Any]]) -> bool:
        for i, patch in enumerate(seq):
            for key, value in patch.items():
                if not isinstance(value, dict):
                    if any(isinstance(later.get(key), dict) for later in seq[i + 1 :]):
                        return True
                else:
                    later_objects: list[dict[str, Any]] = [p[key] for p in seq[i + 1 :] if isinstance(p.get(key), dict)]
                    if replaced_then_object([value, *later_objects]):
                        return True
        return False

    if replaced_then_object(sequence):
        return
    merged: dict[str, Any] = {}
    expected: Any = doc
    for patch in sequence:
        merged = _merge_patch(merged, patch)
        expected = apply_patch(expected, patch)
    assert apply_patch(doc, merged) == expected
