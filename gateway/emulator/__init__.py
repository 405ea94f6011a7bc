"""A local IoT Hub for tests, demos and users' own chaos tests.

``Hub`` is the protocol-agnostic state (registry, connections, received telemetry, cloud-to-device
queues, twins) and ``FaultPlan`` the script of failures; each transport's front (``adapters.<t>.emulator``)
renders what they decide in its own wire form, from the same catalog the translators read. The admin
API (``gateway.emulator.admin``) changes faults and queues C2D while it runs.

Where the emulator stands in for facts about the real hub, this is what it assumes (KNOWN: with its
public source; ASSUMED: why this choice); one entry per behaviour, for the docs' table:

- MQTT 3.1.1 connect with a wrong key, expired token, unknown device or a user name for another hub: CONNACK 5 (not
  authorized). [KNOWN] azure-iot-sdk-c #373, iotedge #526, MicrosoftDocs/azure-docs #38897
- the same on MQTT 5: CONNACK 0x87 (Not authorized), no ``status`` property. [ASSUMED] 0x87 is MQTT 5's name for
  3.1.1's 5 (paho maps 5 -> 135 too); the MQTT 5 preview names 135 for auth failures on DISCONNECT; 0x86 (bad user
  name or password) is not used
- a disabled device on MQTT: CONNACK 3 / 0x88 (server unavailable). [KNOWN] the C SDK reports
  DEVICE_DISABLED on CONNACK 3 (IoT Hub answers 3 for a disabled device)
- a refused telemetry publish on MQTT 3.1.1 (any ERROR fault): the socket is closed (RST), the message not recorded.
  [KNOWN] 3.1.1 has no failing PUBACK, IoT Hub drops the client (the C and Python SDKs expect exactly this)
- a refused publish on MQTT 5: PUBACK (or DISCONNECT for QoS 0) with the reason code and IoT Hub's ``status`` +
  ``trace-id`` user properties. [KNOWN] IoT Hub MQTT 5 preview reference; codes without a preview status get 0x83
  with the six-digit code as ``status`` (our extension)
- ``retry_after`` on MQTT: refused when a fault names ``transport="mqtt"``; a fault for every transport reaches MQTT
  clients without it. [KNOWN] no retry-after in the MQTT 5 preview reference, none in 3.1.1
- ``retry_after`` on HTTP / AMQP: ``Retry-After`` (seconds or date) or ``x-ms-retry-after-ms``; AMQP ``retry-after``
  info. [ASSUMED] no IoT Hub client reads it (neither the SDKs nor the docs mention it); rendered so
  clients can be tested against it
- HTTP error bodies: default: the numeric code as JSON escaped inside ``Message`` (``504101``, ``404103``); legacy
  ``ErrorCode:Name;``, nested, top-level and header-only forms selectable per fault or front. [KNOWN]
  azure-iot-cli-extension #54, azure-iot-sdk-java #640, and the C# SDK's HTTP error parsers and their tests
- ``GET /devices/{id}`` for an unknown device: 404 with 404001 DeviceNotFound in that body. [ASSUMED] the registry
  answers like every other service call
- twin versions: desired and reported ``$version`` each count their own changes from 1; the twin's ``version``
  counts every change. [KNOWN] IoT Hub twin docs (desired/reported versions are separate)
- service twin fields: ``$metadata`` with ``$lastUpdated`` per top-level property (desired also
  ``$lastUpdatedVersion``), ``etag``, ``deviceEtag``, ``lastActivityTime``, ``cloudToDeviceMessageCount``,
  ``authenticationType: sas``, ``connectionState``. [KNOWN] twin JSON in IoT Hub docs; assumed: metadata kept only
  for top-level properties, timestamps from the wall clock
- device-side twin read (MQTT / AMQP): ``{"desired": {...,"$version"}, "reported": {...,"$version"}}`` without
  ``$metadata``. [ASSUMED] what the device SDKs parse; metadata is service-side
- C2D delivery: at least once: locked per delivery; MQTT publishes at QoS 1 (QoS 0 if the device subscribed at 0)
  and completes on PUBACK, gives back what is unacknowledged when the connection ends (redelivered on reconnect); an
  MQTT 5 failure PUBACK abandons. [KNOWN] IoT Hub C2D docs (lock, complete/reject/abandon, max delivery count);
  assumed: the MQTT 5 failure PUBACK meaning
- C2D lock timeout: 60 s on HTTP and AMQP (front setting); MQTT holds the lock until PUBACK or disconnect. [KNOWN]
  IoT Hub docs (default lock timeout one minute)
- maximum delivery count: 10 (``Hub(max_delivery_count=)``); past it the message is dead-lettered with feedback
  ``DeliveryCountExceeded``. [KNOWN] IoT Hub default is 10
- C2D queue depth: 50 per device (``OverflowError`` from ``Hub.send_c2d``, 403 from the admin API). [KNOWN] IoT
  Hub's per-device queue limit of 50
- message id: a UUID when the sender gives none. [KNOWN] issue 11 (the real hub adds one)
- C2D feedback: recorded per the sender's ``ack`` (none/positive/negative/full) with status Success, Rejected or
  DeliveryCountExceeded. [KNOWN] IoT Hub feedback docs; assumed: expiry (``Expired``) is not emulated
- MQTT C2D topic: ``devices/{id}/messages/devicebound/`` + URL-encoded ``$.mid``, ``$.to``, ``$.cid``, then the
  application properties. [KNOWN] IoT Hub MQTT docs and the device SDKs' parsers
- keys: device and ``iothubowner`` keys random per hub unless given or loaded from ``--registry``. [ASSUMED]
  predictable keys taught nothing about key handling (issue 11)
- stall (half-open link): MQTT: the front stops reading (TCP backs up) and answering, keeps the socket until the
  device reconnects, the front drops everything or stops; AMQP: proton lets go of the socket without a frame, held
  open until the device authenticates again. [ASSUMED] a dead link as a client sees it; the real hub eventually
  closes idle links (keep-alive 1.5x, AMQP idle timeout), which the emulator does not
- a fault with ``for_seconds``: lasts from its first match, on the plan's monotonic clock. [ASSUMED] scenarios
  script "throttled for two minutes" from the first refusal, whatever the set-up time
- AMQP SASL: ``MSSBCBS``, ``ANONYMOUS`` and ``PLAIN`` offered (``AmqpFront(offer_mssbcbs=True)``, on in the
  standalone emulator), each accepted, then CBS put-token proves identity. [KNOWN] uamqp asks for MSSBCBS
  (its ``sasl_mssbcbs`` source); other SDKs use ANONYMOUS + CBS. [ASSUMED] the hub accepts the SASL step
  whatever it carries and refuses at put-token; without the shim only proton's own ``ANONYMOUS``/``PLAIN`` are offered
- MQTT and AMQP over WebSockets: on the HTTP(S) front at ``/$iothub/websocket`` with subprotocol ``mqtt`` or
  ``AMQPWSB10``, binary frames piped to the MQTT / AMQP front (TLS is the HTTPS port's). [KNOWN] the SDKs' paths and
  subprotocols (azure-iot-sdk-c #138); [ASSUMED] the query string (``iothub-no-client-cert``) is
  ignored
- built-in Event Hub-compatible endpoint (on the AMQP front): entity = the hub's name; 2 partitions (a device always
  lands in the same one: CRC-32 of its id); a service token signed with the ``iothubowner`` key for any audience;
  ``$management`` READ of the entity and of a partition; receivers on
  ``{entity}/ConsumerGroups/{any}/Partitions/{n}`` honour ``x-opt-offset`` / ``x-opt-sequence-number`` /
  ``x-opt-enqueued-time`` selector filters; events carry the body and application properties as sent, with
  ``x-opt-sequence-number``, ``x-opt-offset`` (the same number as text), ``x-opt-enqueued-time``,
  ``iothub-connection-device-id`` and ``iothub-message-source``. [KNOWN] Event Hubs AMQP conventions and IoT Hub's
  routing docs; [ASSUMED] partition count and hashing, offsets as sequence numbers, consumer groups not kept apart,
  no redirect from the hub's own name to a ``servicebus.windows.net`` host, only the last 10,000 messages kept
- AMQP service side: a put-token whose ``name`` is the hub (not ``.../devices/...``) is checked as a service policy
  token; C2D on ``/messages/devicebound`` with ``to=/devices/{id}/messages/devicebound`` and ``iothub-ack`` as an
  application property (taken off before the device sees it); feedback on ``/messages/servicebound/feedback`` as a
  JSON list (``originalMessageId``, ``deviceId``, ``statusCode``, ``description``, ``enqueuedTimeUtc``) with content
  type ``application/vnd.microsoft.iothub.feedback.json``. [KNOWN] IoT Hub C2D docs and the service SDKs' sources;
  [ASSUMED] an unknown device or a full queue rejects the delivery (404001 / 403004 conditions)
- AMQP link addresses: a service link may name the whole URL (``amqps://{host}/messages/devicebound``) or only the
  path; both are the same node. [KNOWN] azure-iot-hub's uamqp sender does the former (azure/iot/hub/
  iothub_amqp_client.py)
- CBS and ``$management`` answers: ``status-code`` is an AMQP int; an answer to a put-token that arrives before
  its reply link's attach is sent once the link is attached. [KNOWN] uamqp reads it with ``amqpvalue_get_int``
  (azure-uamqp-c amqp_management.c) and sends put-token as soon as its own links are up; [ASSUMED] the hub
  never leaves a put-token unanswered. A CBS answer leaves only after the put-token's disposition is written
  (a later reactor turn, once the connection has no output pending). [KNOWN] uamqp fails a put-token whose
  answer comes before the disposition of its request, whatever the status ("Did not receive send confirmation
  for pending operation", amqp_management.c in uamqp 1.6.11's vendored azure-uamqp-c; it shows as
  TokenAuthFailure, status 200, on every retry on that connection); proton, when the disposition and the
  answer left in one batch, wrote the answer first on some connections (seen on the wire in tests/sdk)
- AMQP performatives carry every field (trailing nulls written out, by the SASL shim, so on the standalone
  emulator's TLS and WebSocket listeners only). [KNOWN] azure-eventhub's pyamqp indexes Open/Begin/Attach/Transfer
  fields without checking (_pyamqp/_connection.py, session.py, receiver.py) and works against the real service,
  so its frames have them; [ASSUMED] a frame filled to the peer's max-frame-size by proton could exceed it by the
  padding (at most 20 bytes; no test message comes near)
- Event Hub-compatible endpoint tokens: signed the Event Hubs way (HMAC keyed with the key's text) or the IoT Hub
  way (with the key's bytes), both accepted. [KNOWN] azure-eventhub signs the former (_pyamqp/utils.py
  ``generate_sas_token``); [ASSUMED] the IoT Hub form is accepted too, to keep our own clients working
- C2D feedback over HTTPS: ``GET /messages/serviceBound/feedback`` answers 200 with the JSON list (the AMQP feedback
  body) and its lock token in ``ETag`` (and ``iothub-messagelocktoken``), or 204 when there is none; ``DELETE
  .../feedback/{lock}`` completes, ``POST .../{lock}/abandon`` gives the batch back, both 204; an unknown lock 412
  DeviceMessageLockLost. [KNOWN] paths and statuses from azure-iot-hub (protocol/operations/
  cloud_to_device_messages_operations.py), which returns None from ``receive_feedback_notification`` and so never
  shows the body; [ASSUMED] where the lock token travels, no lock timeout on a feedback batch
- ports and names: Azure's SDKs take no port (MQTT 8883, HTTPS and WebSockets 443, AMQP 5671 at the connection
  string's ``HostName``), so to serve them unchanged the emulator must listen on those ports at an address the host
  name resolves to (tests/sdk: ``127.77.11.1``, an IP-address host name with a certificate for that address). The
  Event Hub-compatible entity is the host name's first label (``127`` there). [KNOWN] the SDKs' sources;
  [ASSUMED] naming, since the real hub's entity name is chosen at creation
- trust: azure-iot-hub's AMQP C2D sender trusts only certifi's bundle (uamqp/authentication/common.py, the SDK
  passes no ``verify``); a private CA (the emulator's) must be added there, REST calls read ``REQUESTS_CA_BUNDLE``,
  azure-iot-device takes ``server_verification_cert``, azure-eventhub ``connection_verify``. [KNOWN] the SDKs'
  sources; a setup step, not a behaviour of the hub
"""

from __future__ import annotations

from gateway.emulator.faults import Fault, FaultKind, FaultPlan, Operation
from gateway.emulator.hub import C2DFeedback, Device, Hub, QueuedC2D, Received

__all__ = ["C2DFeedback", "Device", "Fault", "FaultKind", "FaultPlan", "Hub", "Operation", "QueuedC2D", "Received"]
