"""Shared fixtures. Fixtures that start real peers (mosquitto, nginx, RabbitMQ, TLS material) live in
``tests/peers/``, one module per peer, and are loaded here so every test directory sees them."""

from __future__ import annotations

import pathlib

pytest_plugins = sorted(
    f"tests.peers.{p.stem}" for p in (pathlib.Path(__file__).parent / "peers").glob("*.py") if p.stem != "__init__"
)
