"""Azure's own Python SDKs, unchanged, driven against the emulator: run by tests/sdk in the SDK venv.

``python scenarios.py NAME JSON``: runs one scenario and prints one JSON line per event (``{"event": ...}``)
and a last line ``{"result": ...}``; the pytest side asserts on them. Only the trust store is set for
the test CA (the way a user of a private CA would); no SDK code is patched.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any


def emit(**fields: Any) -> None:
    print(json.dumps(fields, default=str), flush=True)


def trust(ca_file: str) -> None:
    """The test CA for every stack: requests (azure-iot-hub's REST) reads REQUESTS_CA_BUNDLE, uamqp
    (its C2D sender) only certifi's bundle (uamqp/authentication/common.py: ``self.cert_file or
    certifi.where()``; azure/iot/hub/iothub_amqp_client.py passes no ``verify``)."""
    os.environ["REQUESTS_CA_BUNDLE"] = ca_file
    import certifi

    certifi.where = lambda: ca_file


def failure(exc: BaseException) -> dict[str, Any]:
    cause = exc.__cause__
    out: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc),
                           "cause": type(cause).__name__ if cause is not None else None,
                           "cause_message": str(cause) if cause is not None else None}
    response = getattr(exc, "response", None)
    if response is not None:  # msrest.exceptions.HttpOperationError
        out["status"] = response.status_code
        out["body"] = response.text
    return out


# -- device (azure-iot-device, MQTT / MQTT over WebSockets) ----------------------------------------

def device_flow(args: dict[str, Any]) -> None:
    """Connect, telemetry, twin get / reported patch, then answer what the service does until told."""
    from azure.iot.device import IoTHubDeviceClient, Message, MethodResponse

    client = IoTHubDeviceClient.create_from_connection_string(
        args["connection_string"], server_verification_cert=Path(args["ca"]).read_text(),
        websockets=args.get("websockets", False), connection_retry=False)
    want = set(args.get("wait_for", []))
    seen: set[str] = set()
    done = threading.Event()

    def saw(kind: str, **fields: Any) -> None:
        emit(event=kind, **fields)
        seen.add(kind)
        if want <= seen:
            done.set()

    def on_message(message: Any) -> None:
        saw("c2d", body=message.data.decode(), message_id=message.message_id,
            properties=dict(message.custom_properties))

    def on_method(request: Any) -> None:
        client.send_method_response(MethodResponse.create_from_method_request(
            request, 200, {"echo": request.payload, "name": request.name}))
        saw("method", name=request.name, payload=request.payload)

    def on_patch(patch: Any) -> None:
        saw("desired", patch=patch)

    client.on_message_received = on_message
    client.on_method_request_received = on_method
    client.on_twin_desired_properties_patch_received = on_patch
    client.connect()
    message = Message(args.get("body", "hello"), message_id=args.get("message_id"))
    message.custom_properties.update(args.get("properties", {}))
    client.send_message(message)
    before = client.get_twin()
    client.patch_twin_reported_properties({"firmware": "1.2.3"})
    after = client.get_twin()
    emit(event="ready", twin_before=before, twin_after=after)
    if want:
        done.wait(args.get("timeout", 30))
    client.shutdown()
    emit(result="ok", seen=sorted(seen))


def device_connect(args: dict[str, Any]) -> None:
    """Connect (and optionally read the twin): what the SDK raises is the result."""
    from azure.iot.device import IoTHubDeviceClient

    client = IoTHubDeviceClient.create_from_connection_string(
        args["connection_string"], server_verification_cert=Path(args["ca"]).read_text(),
        websockets=args.get("websockets", False), connection_retry=False)
    try:
        client.connect()
        if args.get("get_twin"):
            client.get_twin()
    except Exception as exc:  # the point: which exception the SDK raises
        emit(result="raised", **failure(exc))
    else:
        emit(result="ok")
    finally:
        client.shutdown()


def device_send(args: dict[str, Any]) -> None:
    """Connect and send one message, with or without the SDK's own reconnection (``connection_retry``)."""
    from azure.iot.device import IoTHubDeviceClient, Message

    client = IoTHubDeviceClient.create_from_connection_string(
        args["connection_string"], server_verification_cert=Path(args["ca"]).read_text(),
        connection_retry=args.get("retry", True))
    client.connect()
    try:
        client.send_message(Message(args.get("body", "x"), message_id=args["message_id"]))
    except Exception as exc:  # the point: which exception the SDK raises
        emit(result="raised", **failure(exc))
    else:
        emit(result="ok")
    finally:
        client.shutdown()


# -- service (azure-iot-hub: REST registry / twin / methods, C2D over AMQP, HTTP feedback) ---------

def service_flow(args: dict[str, Any]) -> None:
    from azure.iot.hub import IoTHubHttpRuntimeManager, IoTHubRegistryManager
    from azure.iot.hub.models import CloudToDeviceMethod, Twin, TwinProperties

    trust(args["ca"])
    import logging

    logging.basicConfig(level=logging.INFO)  # stderr, which a failing test shows
    cs = args["connection_string"]
    registry = IoTHubRegistryManager.from_connection_string(cs)
    out: dict[str, Any] = {}

    def attempt(name: str, fn: Any, *fn_args: Any, **fn_kwargs: Any) -> Any:
        try:
            value = fn(*fn_args, **fn_kwargs)
        except Exception as exc:  # recorded: the scenario compares it with the real hub's
            out[name] = {"raised": failure(exc)}
            return None
        out[name] = value
        return value

    for step in args["steps"]:
        op, device = step["op"], step.get("device", "")
        if op == "create":
            created = attempt(op, registry.create_device_with_sas, device, None, None, "enabled")
            if created is not None:
                out[op] = {"device_id": created.device_id, "status": created.status,
                           "has_key": bool(created.authentication.symmetric_key.primary_key),
                           "connection_string": f"HostName={args['host']};DeviceId={device};SharedAccessKey="
                                                f"{created.authentication.symmetric_key.primary_key}"}
        elif op == "get":
            got = attempt(op, registry.get_device, device)
            if got is not None:
                out[op] = {"device_id": got.device_id, "status": got.status,
                           "connection_state": got.connection_state}
        elif op == "get_missing":
            attempt(op, registry.get_device, device)
        elif op == "list":
            listed = attempt(op, registry.get_devices)
            if listed is not None:
                out[op] = sorted(d.device_id for d in listed)
        elif op == "twin":
            twin = registry.get_twin(device)
            patched = attempt("twin_update", registry.update_twin,
                              device, Twin(properties=TwinProperties(desired=step["desired"])), twin.etag)
            stale = attempt("twin_stale_etag", registry.update_twin,  # the etag it had before that update
                            device, Twin(properties=TwinProperties(desired={"late": 1})), twin.etag)
            out["twin"] = {"version": twin.version, "etag": twin.etag,
                           "desired_version": twin.properties.desired.get("$version"),
                           "reported": twin.properties.reported}
            if patched is not None:
                out["twin_update"] = {"desired": patched.properties.desired, "version": patched.version,
                                      "etag": patched.etag}
            if stale is not None:
                out["twin_stale_etag"] = {"version": stale.version}
        elif op == "method":
            result = attempt(op, registry.invoke_device_method, device, CloudToDeviceMethod(
                method_name=step["name"], payload=step.get("payload"),
                response_timeout_in_seconds=step.get("timeout", 10)))
            if result is not None:
                out[op] = {"status": result.status, "payload": result.payload}
        elif op == "method_offline":
            attempt(op, registry.invoke_device_method, device, CloudToDeviceMethod(
                method_name="reboot", payload={}, response_timeout_in_seconds=5))
        elif op in ("c2d", "c2d_missing"):
            body, props = (step["body"], step.get("properties", {})) if op == "c2d" else ("nobody", {})
            attempt(op, registry.send_c2d_message, device, body, properties=props)
        elif op == "c2d_logins":
            # one new client (a new AMQP connection, a new CBS login) per message
            results = []
            for n in range(step["count"]):
                fresh = IoTHubRegistryManager.from_connection_string(cs)
                attempt(op, fresh.send_c2d_message, device, f"login-{n}")
                results.append(out[op])
                client = getattr(fresh, "amqp_svc_client", None)
                if client is not None:
                    client.disconnect_sync()
            out[op] = results
        elif op == "feedback":
            runtime = IoTHubHttpRuntimeManager.from_connection_string(cs)
            ops = runtime.protocol.cloud_to_device_messages
            deadline = time.monotonic() + step.get("timeout", 10)
            raw = ops.receive_feedback_notification(raw=True)  # the SDK's own call; raw keeps the body
            while raw.response.status_code == 204 and time.monotonic() < deadline:
                time.sleep(0.2)
                raw = ops.receive_feedback_notification(raw=True)
            token = raw.response.headers.get("ETag", "").strip('"')
            out[op] = {"status": raw.response.status_code,
                       "records": raw.response.json() if raw.response.status_code == 200 else []}
            if token:
                attempt("feedback_complete", runtime.complete_feedback_notification, token)
                attempt("feedback_complete_again", runtime.complete_feedback_notification, token)
            out["feedback_empty"] = runtime.receive_feedback_notification()  # 204: the SDK returns None
        elif op == "delete":
            attempt(op, registry.delete_device, device)
        emit(event="step", op=op)
    amqp = getattr(registry, "amqp_svc_client", None)
    if amqp is not None:
        amqp.disconnect_sync()  # before interpreter shutdown, or uamqp's destructor logs a traceback
    emit(result=out)


# -- Event Hub-compatible endpoint (azure-eventhub) ----------------------------------------------

def read_telemetry(args: dict[str, Any]) -> None:
    """Read every partition from the start until the wanted message ids arrive (or the time is up)."""
    from azure.eventhub import EventHubConsumerClient

    client = EventHubConsumerClient.from_connection_string(
        args["connection_string"], consumer_group="$Default", connection_verify=args["ca"])
    wanted = set(args["message_ids"])
    found: dict[str, Any] = {}
    stop = threading.Event()

    def on_event(context: Any, event: Any) -> None:
        if event is None:
            return
        mid = event.message.properties.message_id if event.message.properties else None
        mid = mid.decode() if isinstance(mid, bytes) else mid
        if mid in wanted:
            found[mid] = {"body": event.body_as_str(), "partition": context.partition_id,
                          "properties": {(k.decode() if isinstance(k, bytes) else k):
                                         (v.decode() if isinstance(v, bytes) else v)
                                         for k, v in (event.properties or {}).items()},
                          "system": {(k.decode() if isinstance(k, bytes) else k):
                                     (v.decode() if isinstance(v, bytes) else str(v))
                                     for k, v in event.system_properties.items()},
                          "sequence_number": event.sequence_number}
            if wanted <= set(found):
                stop.set()

    with client:
        partitions = client.get_partition_ids()
        worker = threading.Thread(target=client.receive, kwargs={
            "on_event": on_event, "starting_position": "-1", "max_wait_time": 1}, daemon=True)
        worker.start()
        stop.wait(args.get("timeout", 30))
    emit(result={"partitions": partitions, "found": found})


if __name__ == "__main__":
    globals()[sys.argv[1]](json.loads(sys.argv[2]))
