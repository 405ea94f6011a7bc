"""Azure's own SDKs (azure-iot-device, azure-iot-hub, azure-eventhub), unchanged, against the emulator.

Each test asserts what the SDK returns or raises as it would against the real hub; the SDK source that
decides it is cited where the mapping is not obvious (paths inside each SDK's package).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway.codes import code_of
from tests.sdk.conftest import HOST, EmulatedHub


def _other_key(connection_string: str) -> str:
    """The same connection string with a valid-looking key the hub never issued."""
    return re.sub(r"SharedAccessKey=[^;]+", "SharedAccessKey=" + "A" * 43 + "=", connection_string)


@pytest.mark.parametrize(("device", "websockets"), [("sdk-mqtt", False), ("sdk-ws", True)], ids=["mqtt", "websockets"])
def test_device_and_service_flow(emulated_hub: EmulatedHub, run_sdk: Any, device: str, websockets: bool) -> None:
    """Device SDK: telemetry, twin, desired patch, direct method, C2D; service SDK drives the other side."""
    device_run = run_sdk("device_flow", {
        "connection_string": emulated_hub.devices[device], "ca": str(emulated_hub.ca), "websockets": websockets,
        "message_id": f"m-{device}", "body": "21.5", "properties": {"unit": "C"},
        "wait_for": ["desired", "method", "c2d"]})
    ready = device_run.until("event")
    assert ready["event"] == "ready"
    before, after = ready["twin_before"], ready["twin_after"]
    # azure/iot/device/iothub/sync_clients.py get_twin returns the twin JSON as the hub sends it
    assert set(before) == {"desired", "reported"}
    assert after["reported"]["firmware"] == "1.2.3"
    assert after["reported"]["$version"] == before["reported"]["$version"] + 1  # reported counts alone
    assert after["desired"]["$version"] == before["desired"]["$version"]

    received = emulated_hub.admin_call("GET", f"/messages?device={device}")
    sent = [m for m in received["messages"] if m["message_id"] == f"m-{device}"]
    assert len(sent) == 1
    assert sent[0]["properties"].get("unit") == "C"

    service_run = run_sdk("service_flow", {
        "connection_string": emulated_hub.service, "ca": str(emulated_hub.ca), "host": "",
        "steps": [{"op": "twin", "device": device, "desired": {"fan": "on"}},
                  {"op": "method", "device": device, "name": "reboot", "payload": {"delay": 1}},
                  {"op": "c2d", "device": device, "body": "to-device",
                   "properties": {"iothub-ack": "full", "kind": "test"}},
                  {"op": "feedback"}]})
    service = service_run.result()

    events: dict[str, dict[str, Any]] = {}
    while "result" not in (event := device_run.next()):
        events[event["event"]] = event
    assert event["result"] == "ok" and event["seen"] == ["c2d", "desired", "method"], (
        event, {k: service.get(k) for k in ("c2d", "feedback")}, emulated_hub.admin_call("GET", "/feedback"),
        "".join(service_run.stderr)[-3000:])
    assert events["desired"]["patch"]["fan"] == "on"
    assert events["desired"]["patch"]["$version"] == service["twin_update"]["desired"]["$version"]
    assert events["method"]["name"] == "reboot" and events["method"]["payload"] == {"delay": 1}
    assert events["c2d"]["body"] == "to-device"
    assert events["c2d"]["properties"].get("kind") == "test"
    assert "iothub-ack" not in events["c2d"]["properties"]  # the hub takes it off

    # service side as the real hub answers it
    assert service["twin_update"]["desired"]["fan"] == "on"
    assert service["twin_update"]["etag"] != service["twin"]["etag"]
    stale = service["twin_stale_etag"]["raised"]  # msrest HttpOperationError: If-Match no longer matches
    assert stale["type"] == "HttpOperationError" and stale["status"] == 412
    assert service["method"] == {"status": 200, "payload": {"echo": {"delay": 1}, "name": "reboot"}}
    assert service["c2d"] is None  # send_c2d_message returns None once the hub accepted it
    assert service["feedback"]["status"] == 200
    assert [(r["deviceId"], r["statusCode"]) for r in service["feedback"]["records"]] == [(device, "Success")]
    assert service["feedback_complete"] is None
    assert service["feedback_complete_again"]["raised"]["status"] == 412  # the lock is gone
    assert service["feedback_empty"] is None  # 204: nothing more


def test_wrong_key_and_unknown_device_raise_credential_error(emulated_hub: EmulatedHub, run_sdk: Any) -> None:
    """CONNACK 5 (not authorized) -> UnauthorizedError -> CredentialError, as with the real hub
    (azure/iot/device/common/mqtt_transport.py CONNACK_REFUSED_NOT_AUTHORIZED, iothub/sync_clients.py
    handle_result); CONNACK 2 would have been a ClientError (issue 11)."""
    good = emulated_hub.devices["sdk-auth"]
    for connection_string in (_other_key(good), good.replace("DeviceId=sdk-auth", "DeviceId=sdk-ghost")):
        for websockets in (False, True):
            result = run_sdk("device_connect", {"connection_string": connection_string,
                                                "ca": str(emulated_hub.ca), "websockets": websockets})
            event = result.until("result")
            assert event["result"] == "raised"
            assert event["type"] == "CredentialError", event
    assert run_sdk("device_connect", {"connection_string": good, "ca": str(emulated_hub.ca)}).result() == "ok"


def test_throttled_twin_request(emulated_hub: EmulatedHub, run_sdk: Any) -> None:
    """A throttled twin GET: the hub answers status 429 on ``$iothub/twin/res/``; the SDK does not retry
    it and raises ClientError from ServiceError (iothub/pipeline/pipeline_stages_iothub.py: status >= 300
    -> ServiceError; sync_clients.py handle_result wraps what it does not name)."""
    device = "sdk-throttle"
    emulated_hub.admin_call("POST", "/faults", {"operation": "twin_get", "code": code_of("ThrottlingException"),
                                                "device": device, "times": 1})
    try:
        args = {"connection_string": emulated_hub.devices[device], "ca": str(emulated_hub.ca), "get_twin": True}
        event = run_sdk("device_connect", args).until("result")
        assert event["result"] == "raised"
        assert (event["type"], event["cause"]) == ("ClientError", "ServiceError")
        assert "429" in event["cause_message"]
        assert run_sdk("device_connect", args).result() == "ok"  # one refusal, then served
    finally:
        emulated_hub.admin_call("DELETE", "/faults")


def test_throttled_telemetry_over_mqtt_311_drops_the_connection(emulated_hub: EmulatedHub, run_sdk: Any) -> None:
    """MQTT 3.1.1 has no failing PUBACK: the hub closes the socket on a throttled publish. Without its own
    reconnection the SDK cancels the publish (OperationCancelled: the in-flight operation ends with the
    connection, azure/iot/device/common/mqtt_transport.py); with it (the default) it reconnects and publishes
    again, and the hub keeps only the accepted copy."""
    device = "sdk-throttle"
    throttle = {"operation": "telemetry", "code": code_of("ThrottlingException"), "device": device, "times": 1}
    args = {"connection_string": emulated_hub.devices[device], "ca": str(emulated_hub.ca)}
    try:
        emulated_hub.admin_call("POST", "/faults", throttle)
        event = run_sdk("device_send", {**args, "retry": False, "message_id": "thr-once"}).until("result")
        assert (event["result"], event["type"]) == ("raised", "OperationCancelled")
        emulated_hub.admin_call("POST", "/faults", throttle)
        assert run_sdk("device_send", {**args, "retry": True, "message_id": "thr-again"}).result() == "ok"
        assert emulated_hub.admin_call("GET", "/faults") == []
    finally:
        emulated_hub.admin_call("DELETE", "/faults")
    received = emulated_hub.admin_call("GET", f"/messages?device={device}")["messages"]
    assert [m["message_id"] for m in received] == ["thr-again"]


def test_service_registry_and_refusals(emulated_hub: EmulatedHub, run_sdk: Any) -> None:
    """azure-iot-hub's registry (REST), its errors' bodies, and C2D to a device that does not exist."""
    service = run_sdk("service_flow", {
        "connection_string": emulated_hub.service, "ca": str(emulated_hub.ca), "host": HOST,
        "steps": [{"op": "create", "device": "sdk-new"}, {"op": "get", "device": "sdk-new"}, {"op": "list"},
                  {"op": "get_missing", "device": "sdk-ghost"}, {"op": "method_offline", "device": "sdk-svc"},
                  {"op": "c2d_missing", "device": "sdk-ghost"}]}).result()
    assert service["create"]["device_id"] == "sdk-new" and service["create"]["status"] == "enabled"
    assert service["create"]["has_key"]
    assert service["get"] == {"device_id": "sdk-new", "status": "enabled", "connection_state": "Disconnected"}
    assert {"sdk-new", "sdk-svc"} <= set(service["list"])
    missing = service["get_missing"]["raised"]
    assert missing["type"] == "HttpOperationError" and missing["status"] == 404
    assert str(code_of("DeviceNotFound")) in missing["body"]
    offline = service["method_offline"]["raised"]
    assert offline["status"] == 404 and str(code_of("DeviceNotOnline")) in offline["body"]
    # iothub_amqp_client.py: any rejected delivery is a bare Exception("C2D message send failure")
    assert service["c2d_missing"]["raised"] == {"type": "Exception", "message": "C2D message send failure",
                                                "cause": None, "cause_message": None}

    # the new identity's key connects a device; deleted, it no longer does
    new_device = service["create"]["connection_string"]
    assert run_sdk("device_connect", {"connection_string": new_device, "ca": str(emulated_hub.ca)}).result() == "ok"
    deleted = run_sdk("service_flow", {"connection_string": emulated_hub.service, "ca": str(emulated_hub.ca),
                                       "host": "", "steps": [{"op": "delete", "device": "sdk-new"}]}).result()
    assert deleted["delete"] is None
    event = run_sdk("device_connect", {"connection_string": new_device, "ca": str(emulated_hub.ca)}).until("result")
    assert event["type"] == "CredentialError"


def test_event_hub_consumer_reads_device_telemetry(emulated_hub: EmulatedHub, run_sdk: Any) -> None:
    """Telemetry sent with azure-iot-device is read back with azure-eventhub from the built-in endpoint."""
    device = "sdk-eh"
    sent = run_sdk("device_flow", {"connection_string": emulated_hub.devices[device], "ca": str(emulated_hub.ca),
                                   "message_id": "eh-1", "body": "{\"t\": 7}", "properties": {"alert": "no"}})
    assert sent.result() == "ok"
    read = run_sdk("read_telemetry", {"connection_string": emulated_hub.event_hub, "ca": str(emulated_hub.ca),
                                      "message_ids": ["eh-1"]}).result()
    assert read["partitions"] == ["0", "1"]
    event = read["found"]["eh-1"]
    assert event["body"] == "{\"t\": 7}"
    assert event["properties"].get("alert") == "no"
    assert event["system"].get("iothub-connection-device-id") == device
    assert event["system"].get("message-id") == "eh-1"
    assert int(event["sequence_number"]) >= 0


def test_c2d_login_every_time(emulated_hub: EmulatedHub, run_sdk: Any) -> None:
    """uamqp's CBS login on a new connection, twenty times in a row: each is answered and each C2D accepted.

    Before the emulator held its put-token answer back until the put-token's disposition was written, an
    emulator that had served the device flows above failed this on the second or third connection:
    uamqp fails a put-token whose answer arrives before its disposition, though it reads status 200.
    """
    service = run_sdk("service_flow", {
        "connection_string": emulated_hub.service, "ca": str(emulated_hub.ca), "host": "",
        "steps": [{"op": "c2d_logins", "device": "sdk-svc", "count": 20}]})
    results = service.result()["c2d_logins"]
    assert results == [None] * 20, (results, "".join(service.stderr)[-3000:])
