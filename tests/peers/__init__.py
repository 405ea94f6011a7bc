"""Fixtures that start real peers. A missing peer skips on a developer's machine and fails in CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_peer(message: str) -> NoReturn:
    """CI installs every peer (scripts/test), so there a missing one is a failure, never a skip."""
    if in_ci():
        pytest.fail(f"{message}; CI must have it (scripts/test installs it)")
    pytest.skip(message)
