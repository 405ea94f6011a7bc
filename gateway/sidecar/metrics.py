"""Prometheus metrics of the sidecar, in a registry of its own (several sidecars can share a process).

- ``iothub_gateway_messages_total{transport,outcome,code}``: accepted, delivered, duplicate (delivered
  again after an uncertain attempt), dead_letter (with its code), rejected (API refused it, with the code).
- ``iothub_gateway_handler_events_total{code,transport,outcome}``: the handlers' own counters
  (``Handler.metrics()``): retries, reconnects, throttles, holds, state changes, by code.
- ``iothub_gateway_outbox_messages{status}`` and ``iothub_gateway_queue_depth{device,transport}``: gauges
  read from the outbox's in-memory counts at scrape time (no query). ``pending``, ``inflight`` and
  ``dead`` are held now; ``delivered`` is the total since the outbox file was made (retention does not
  lower it).
- ``iothub_gateway_outbox_up`` (1 while the outbox can store; 0 on disk full, I/O error, lock, corruption)
  and ``iothub_gateway_outbox_file_bytes`` (the file and its WAL on disk: retention keeps it bounded).
- ``iothub_gateway_connection_state{device,transport,state}``: 1 for each device's current state.
- ``iothub_gateway_delivery_latency_seconds{transport}``: accepted -> acknowledged by the hub.

- ``iothub_gateway_device_last_error_timestamp_seconds{device,transport,code,name}``: when each device last
  failed, labelled with that failure's code. One series per device (only its latest error), so the
  cardinality is bounded by the configured devices, never by the codes seen.
- ``iothub_gateway_devices{transport,state}``: how many devices are in each state (kept as state changes
  happen), and ``iothub_gateway_devices_without_series``: devices left out of the per-device series.
- ``iothub_gateway_amqp_connections{upstream}`` and ``iothub_gateway_amqp_multiplexed_devices{upstream}``:
  the shared AMQP connections per upstream and the devices on them.

Per-device series (queue depth, connection state, last error) are capped (``[metrics] per_device_max``,
100 by default): a sidecar with 10,000 devices would otherwise expose ~100,000 series per scrape. Within
the cap, devices needing attention (not connected or throttled) come first, then the rest by id; the
per-state aggregates always count every device.
- ``iothub_gateway_build_info{version,python}`` (always 1) and the ``process_*`` metrics (CPU, RSS, open
  files, start time) of prometheus_client's process collector, on this registry.

Counters and histograms carry no ``_created`` series: they double the series count and the sidecar's
``process_start_time_seconds`` already says when counting began. prometheus_client switches them off
process-wide only (``disable_created_metrics``), which fits: the sidecar owns its process.

Labels carry codes, transports, outcomes, states and device ids: never a credential.
"""

from __future__ import annotations

import heapq
import itertools
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "DeviceSnapshot", "DeviceStates", "Fleet", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)


@dataclass(frozen=True, slots=True)
class DeviceSnapshot:
    device: str
    transport: str
    state: str
    queued: int
    handler_counts: Mapping[tuple[int | None, str, str], int]
    #: the device's latest error: (code, its name, epoch seconds), or None while it has had none
    last_error: tuple[int, str, float] | None = None


@dataclass(frozen=True, slots=True)
class Fleet:
    """What every device adds up to, for the aggregates (read at scrape time, kept as events happen)."""

    per_state: Mapping[tuple[str, str], int]  #: (transport, state) -> devices
    omitted: int  #: devices without per-device series this scrape
    handler_counts: Mapping[tuple[int | None, str, str], int]  #: summed over every handler
    amqp: Mapping[str, list[int]]  #: upstream -> devices on each live shared connection


#: States in which a device needs no attention (per-device series go to the others first).
_HEALTHY = frozenset({"connected", "throttled"})


class DeviceStates:
    """Each device's state and the count per (transport, state), updated on every state change, so
    neither the aggregates nor the choice of per-device series scans the devices at scrape time."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[str, str]] = {}
        self.per_state: dict[tuple[str, str], int] = {}
        self.attention: set[str] = set()  #: devices not connected (nor throttled)

    def set(self, device: str, transport: str, state: str) -> None:
        old = self._state.get(device)
        new = (transport, state)
        if old == new:
            return
        if old is not None:
            left = self.per_state[old] - 1
            if left:
                self.per_state[old] = left
            else:
                del self.per_state[old]
        self._state[device] = new
        self.per_state[new] = self.per_state.get(new, 0) + 1
        if state in _HEALTHY:
            self.attention.discard(device)
        else:
            self.attention.add(device)

    def pick(self, ordered: Sequence[str], limit: int) -> list[str]:
        """Up to ``limit`` device ids for per-device series: needing attention first, then by id."""
        if limit <= 0:
            return []
        chosen = heapq.nsmallest(limit, self.attention)
        if len(chosen) < limit:
            taken = set(chosen)
            chosen += [d for d in itertools.islice((d for d in ordered if d not in taken), limit - len(chosen))]
        return chosen

    def __len__(self) -> int:
        return len(self._state)


def _code(code: int | None) -> str:
    return "" if code is None else str(code)


def _version() -> str:
    from gateway.cli import package_version

    return package_version()


class _Live(Collector):
    """Reads the outbox and the handlers when scraped, so gauges are never stale."""

    def __init__(self, devices: Callable[[], Iterable[DeviceSnapshot]], outbox: Callable[[], Mapping[str, int]],
                 states: Iterable[str], storage: Callable[[], tuple[bool, int]] | None = None,
                 fleet: Callable[[], Fleet] | None = None) -> None:
        self._devices = devices
        self._outbox = outbox
        self._states = tuple(states)
        self._storage = storage
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        snaps = list(self._devices())
        counts = self._outbox()
        outbox = GaugeMetricFamily("iothub_gateway_outbox_messages", "Messages in the outbox by status",
                                   labels=["status"])
        for status in ("pending", "inflight", "delivered", "dead"):
            outbox.add_metric([status], counts.get(status, 0))
        yield outbox
        if self._storage is not None:
            up, size = self._storage()
            yield GaugeMetricFamily("iothub_gateway_outbox_up", "1 while the outbox can store messages",
                                    value=1 if up else 0)
            yield GaugeMetricFamily("iothub_gateway_outbox_file_bytes", "The outbox file and its WAL on disk",
                                    value=size)
        depth = GaugeMetricFamily("iothub_gateway_queue_depth", "Messages not yet delivered, per device",
                                  labels=["device", "transport"])
        state = GaugeMetricFamily("iothub_gateway_connection_state", "1 for the current state of each device",
                                  labels=["device", "transport", "state"])
        last = GaugeMetricFamily("iothub_gateway_device_last_error_timestamp_seconds",
                                 "When each device last failed (epoch seconds), with that failure's code",
                                 labels=["device", "transport", "code", "name"])
        events: dict[tuple[str, str, str], int] = {}
        for snap in snaps:
            depth.add_metric([snap.device, snap.transport], snap.queued)
            if snap.last_error is not None:
                err_code, err_name, at = snap.last_error
                last.add_metric([snap.device, snap.transport, str(err_code), err_name], at)
            for name in self._states:
                state.add_metric([snap.device, snap.transport, name], 1 if name == snap.state else 0)
            for (code, transport, outcome), n in snap.handler_counts.items():
                key = (_code(code), transport, outcome)
                events[key] = events.get(key, 0) + n
        yield depth
        yield state
        yield last
        fleet = self._fleet() if self._fleet is not None else None
        if fleet is not None:  # every handler, not only those with per-device series
            events = {}
            for (code, transport, outcome), n in fleet.handler_counts.items():
                key = (_code(code), transport, outcome)
                events[key] = events.get(key, 0) + n
        handler = CounterMetricFamily("iothub_gateway_handler_events", "The handlers' counters by code, "
                                      "transport and outcome", labels=["code", "transport", "outcome"])
        for key, n in sorted(events.items()):
            handler.add_metric(list(key), n)
        yield handler
        if fleet is None:
            return
        per_state = GaugeMetricFamily("iothub_gateway_devices", "Devices per transport and state",
                                      labels=["transport", "state"])
        for (transport, name), n in sorted(fleet.per_state.items()):
            per_state.add_metric([transport, name], n)
        yield per_state
        yield GaugeMetricFamily("iothub_gateway_devices_without_series", "Devices left out of the per-device "
                                "series ([metrics] per_device_max)", value=fleet.omitted)
        conns = GaugeMetricFamily("iothub_gateway_amqp_connections", "Shared (multiplexed) AMQP connections",
                                  labels=["upstream"])
        members = GaugeMetricFamily("iothub_gateway_amqp_multiplexed_devices", "Devices on shared AMQP "
                                    "connections", labels=["upstream"])
        for upstream, sizes in sorted(fleet.amqp.items()):
            conns.add_metric([upstream], len(sizes))
            members.add_metric([upstream], sum(sizes))
        yield conns
        yield members


class Metrics:
    def __init__(self, version: str | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
        self.registry = CollectorRegistry(auto_describe=False)
        build = Gauge("iothub_gateway_build_info", "Always 1; the labels say which build runs",
                      ["version", "python"], registry=self.registry)
        build.labels(version or _version(), platform.python_version()).set(1)
        ProcessCollector(registry=self.registry)
        self.messages = Counter("iothub_gateway_messages", "Messages by transport, outcome and code",
                                ["transport", "outcome", "code"], registry=self.registry)
        self._children: dict[tuple[str, str, int | None], Counter] = {}
        self._latency: dict[str, Histogram] = {}
        self.states = DeviceStates()
        self.latency = Histogram("iothub_gateway_delivery_latency_seconds",
                                 "From acceptance by the API to acknowledgement by the hub", ["transport"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)

    def watch(self, devices: Callable[[], Iterable[DeviceSnapshot]], outbox: Callable[[], Mapping[str, int]],
              states: Iterable[str], *, storage: Callable[[], tuple[bool, int]] | None = None,
              fleet: Callable[[], Fleet] | None = None) -> None:
        """``devices``: the snapshots to give per-device series; ``storage`` -> (the outbox can store, its
        size on disk in bytes); ``fleet``: the aggregates over every device (and the handler counters)."""
        self.registry.register(_Live(devices, outbox, states, storage, fleet))

    def message(self, transport: str, outcome: str, code: int | None = None, n: int = 1) -> None:
        # Children are kept: ``labels()`` takes a lock and builds a key on every call, once per message.
        # Bounded: transports x outcomes x the catalog's codes.
        key = (transport, outcome, code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.messages.labels(transport, outcome, _code(code))
        child.inc(n)

    def delivered(self, transport: str, latency: float, *, duplicate: bool) -> None:
        self.message(transport, "duplicate" if duplicate else "delivered")
        histogram = self._latency.get(transport)
        if histogram is None:
            histogram = self._latency[transport] = self.latency.labels(transport)
        histogram.observe(max(0.0, latency))

    def render(self) -> bytes:
        return generate_latest(self.registry)
