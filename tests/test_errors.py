"""The IoTHubError tree: classes follow actions, pickling, to_dict, str."""

from __future__ import annotations

import json
import pickle

import pytest

import gateway
from gateway import codes
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

EXPECTED = {
    429001: ThrottledError, 503008: ThrottledError, 403002: QuotaExceededError, 401003: CredentialsExpiredError,
    401002: UnauthorizedError, 404103: DeviceOfflineError, 504101: DeviceOfflineError,
    400027: IdentityConflictError, 409002: IdentityConflictError, 404104: ConnectionLostError,
    500001: ServerError, 503003: ServerError, 400004: RequestError, 413001: RequestError,
    404001: FatalError, 504901: OperationTimeoutError,
}


@pytest.mark.parametrize(("code", "cls"), sorted(EXPECTED.items()))
def test_class_follows_what_the_caller_does(code: int, cls: type[IoTHubError]) -> None:
    err = make_error(code, transport="mqtt")
    assert isinstance(err, cls)
    assert err.retryable == isinstance(err, RetryableError)


def test_credentials_expired_is_also_unauthorized_and_timeout_is_a_builtin_timeout() -> None:
    assert isinstance(make_error(401003, transport="http"), UnauthorizedError)
    assert isinstance(make_error(504901, transport="network"), TimeoutError)
    assert not isinstance(make_error(401002, transport="http"), RetryableError)


def test_every_catalog_code_builds_pickles_and_serializes() -> None:
    for row in codes.all_codes():
        err = make_error(row.code, transport="amqp", tracking_id="t-1", native={"k": b"\xff", "n": {1: (2,)}})
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is type(err)
        assert again.to_dict() == err.to_dict()
        json.dumps(err.to_dict())
        assert err.code == row.code and err.name == row.name and err.action is row.action


def test_str_reads_like_code_name_message_and_delay() -> None:
    err = make_error(429001, transport="http", message="Throttled", retry_after=7)
    assert str(err) == "429001 ThrottlingException: Throttled (retry after 7s)"
    assert str(make_error(404001, transport="http")).startswith("404001 DeviceNotFound: ")


def test_family_codes_are_never_exact_and_bad_delays_are_dropped() -> None:
    err = make_error(500123, transport="http", exact=True, retry_after=float("nan"))
    assert err.exact is False and err.retry_after is None
    assert make_error(429001, transport="http", retry_after=-1).retry_after is None


def test_unknown_transport_is_rejected() -> None:
    with pytest.raises(ValueError, match="transport"):
        make_error(429001, transport="carrier-pigeon")


def test_public_names() -> None:
    assert gateway.IoTHubError is IoTHubError
    assert isinstance(gateway.lookup(429001), codes.CodeInfo)
