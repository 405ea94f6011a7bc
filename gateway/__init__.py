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

__all__ = [
    "Action",
    "CodeInfo",
    "ConnectionLostError",
    "CredentialsExpiredError",
    "DeviceOfflineError",
    "FatalError",
    "IdentityConflictError",
    "IoTHubError",
    "OperationTimeoutError",
    "QuotaExceededError",
    "RequestError",
    "RetryableError",
    "ServerError",
    "ThrottledError",
    "UnauthorizedError",
    "by_name",
    "lookup",
    "make_error",
    "normalize",
]
