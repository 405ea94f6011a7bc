"""MQTT adapter: IoT Hub's MQTT answers (reason codes, ``status`` properties, response topics) as codes.

Importing this package does not import paho; only the pure translator is exposed here.
"""

from __future__ import annotations

from adapters.mqtt.translate import (
    IOTHUB_STATUSES,
    MAX_BODY,
    PACKETS,
    WireForm,
    reason_name,
    render,
    translate,
    translate_topic,
)

__all__ = [
    "IOTHUB_STATUSES",
    "MAX_BODY",
    "PACKETS",
    "WireForm",
    "reason_name",
    "render",
    "translate",
    "translate_topic",
]
