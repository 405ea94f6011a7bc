"""The sidecar: ``iothub-gateway run``. A local HTTP API that accepts telemetry into a durable outbox and
delivers it upstream through the shared handler, for edge apps in any language.

Importing this package imports nothing heavy; ``gateway.sidecar.app`` pulls in aiohttp.
"""

from __future__ import annotations

from gateway.sidecar.config import ConfigError, SidecarConfig, load_config

__all__ = ["ConfigError", "SidecarConfig", "load_config"]
