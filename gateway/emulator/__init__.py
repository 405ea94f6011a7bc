"""A local IoT Hub for tests, demos and users' own chaos tests.

``Hub`` is the protocol-agnostic state (registry, connections, received telemetry, cloud-to-device
queues) and ``FaultPlan`` the script of failures; each transport's front (``adapters.<t>.emulator``)
renders what they decide in its own wire form, from the same catalog the translators read.
"""

from __future__ import annotations

from gateway.emulator.faults import Fault, FaultKind, FaultPlan, Operation
from gateway.emulator.hub import Device, Hub, Received

__all__ = ["Device", "Fault", "FaultKind", "FaultPlan", "Hub", "Operation", "Received"]
