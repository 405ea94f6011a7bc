"""iothub-error-adapter: every IoT Hub transport failure as one six-digit code, and one handler for it.

The core imports no transport library: ``import gateway`` pulls in neither aiohttp, paho nor proton.
"""

from __future__ import annotations

from gateway.codes import Action, CodeInfo, by_name, lookup
from gateway.errors import (
    ConnectionLostError,
    CredentialsExpiredError,
    DeviceOfflineError,
    FatalError,
    IdentityConflictError,
    IoTHubError,
    OperationTimeoutError,
    QuotaExceededError,
    RequestError,
    RetryableError,
    ServerError,
    ThrottledError,
    UnauthorizedError,
    make_error,
)
from gateway.normalize import normalize

__version__ = "0.1.0"

# The runtime (asyncio) is loaded on first use, so `import gateway` stays a catalog-only import.
_LAZY = {
    "Handler": "gateway.handler",
    "State": "gateway.handler",
    "StateChange": "gateway.handler",
    "Policy": "gateway.policy",
    "PolicyConfig": "gateway.policy",
    "load_policy": "gateway.policy",
    "Message": "gateway.transport",
    "Transport": "gateway.transport",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gateway' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

__all__ = [
    "Action",
    "CodeInfo",
    "ConnectionLostError",
    "CredentialsExpiredError",
    "DeviceOfflineError",
    "FatalError",
    "Handler",
    "IdentityConflictError",
    "IoTHubError",
    "Message",
    "OperationTimeoutError",
    "Policy",
    "PolicyConfig",
    "QuotaExceededError",
    "RequestError",
    "RetryableError",
    "ServerError",
    "State",
    "StateChange",
    "ThrottledError",
    "Transport",
    "UnauthorizedError",
    "by_name",
    "load_policy",
    "lookup",
    "make_error",
    "normalize",
]
