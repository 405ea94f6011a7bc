"""The fuzz tests that drive a running sidecar reuse the sidecar tests' fixture."""

from tests.sidecar.conftest import start_sidecar

__all__ = ["start_sidecar"]
