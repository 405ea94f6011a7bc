"""The catalog of IoT Hub's six-digit error codes: the one table everything else reads.

A code is ``status * 1000 + n``: its first three digits are the HTTP status family. IoT Hub's own list
(the troubleshooting page, 2026) is the backbone; where the SDKs or older tables used another number or
name, the table keeps IoT Hub's current one and accepts the other as an alias on input.

Rows whose ``origin`` is ``"gateway"`` are defined by this project: the generic ``status * 1000`` code of
every standard HTTP status that IoT Hub does not name itself (so a bare proxy status still has a code),
and a few ``x9xx`` codes for failures that are not protocol answers at all (a refused socket, a failed
TLS verification). IoT Hub never uses the ``900``-``999`` range, so they cannot collide with its codes.

A six-digit code in ``300000``-``599999`` that is not in the table still resolves, to its status's
family row (its ``status * 1000`` code), flagged ``known=False``: an error never carries an unlisted
code (see :func:`lookup`). Anything else is a ``ValueError``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final, Literal

__all__ = [
    "TRANSPORTS",
    "Action",
    "CodeInfo",
    "all_codes",
    "by_name",
    "code_of",
    "family",
    "for_status",
    "lookup",
    "parse_code",
    "status_action",
]


class Action(enum.StrEnum):
    """What the shared handler does by default about a code."""

    RETRY = "retry"  #: retry the operation with capped, jittered exponential backoff
    THROTTLE = "throttle"  #: back off on the slower throttle curve, honouring the peer's delay
    RECONNECT = "reconnect"  #: the connection is gone: reconnect with backoff
    REFRESH_CREDENTIALS = "refresh_credentials"  #: renew the SAS token, then reconnect
    WAIT_FOR_DEVICE = "wait_for_device"  #: hold work for the target device until it is online
    WAIT_FOR_QUOTA_RESET = "wait_for_quota_reset"  #: park sending until the daily quota resets
    STOP_IDENTITY_CONFLICT = "stop_identity_conflict"  #: another client holds this identity
    STOP = "stop"  #: a permanent refusal of the connection: do not reconnect
    FAIL = "fail"  #: this operation can never succeed as sent: fail it (dead-letter)

    @property
    def transient(self) -> bool:
        """True when the same operation can succeed later without anyone changing anything."""
        return self not in _NOT_TRANSIENT


_NOT_TRANSIENT: Final = frozenset({Action.STOP, Action.FAIL, Action.STOP_IDENTITY_CONFLICT})

Transport = Literal["http", "mqtt", "amqp"]
TRANSPORTS: Final[tuple[str, ...]] = ("http", "mqtt", "amqp")
Origin = Literal["iothub", "gateway"]


@dataclass(frozen=True, slots=True)
class CodeInfo:
    """One row of the catalog."""

    code: int
    name: str
    http_status: int | None  #: None for the codes that never come as an HTTP response
    transports: frozenset[str]
    action: Action
    description: str
    origin: Origin = "iothub"
    aliases: tuple[str, ...] = ()  #: other names accepted on input
    alias_codes: tuple[int, ...] = ()  #: other numbers accepted on input
    known: bool = True  #: False when resolved to a family rather than found in the table

    @property
    def transient(self) -> bool:
        return self.action.transient

    @property
    def family_status(self) -> int:
        return self.code // 1000

    def to_dict(self) -> dict[str, object]:
        return {
            "code": self.code,
            "name": self.name,
            "http_status": self.http_status,
            "transports": sorted(self.transports),
            "transient": self.transient,
            "action": self.action.value,
            "description": self.description,
            "origin": self.origin,
            "aliases": list(self.aliases),
            "alias_codes": list(self.alias_codes),
            "known": self.known,
        }


# Transport sets. DEV: the device surfaces (all three protocols); SVC: service / registry REST only.
_DEV = frozenset({"http", "mqtt", "amqp"})
_SVC = frozenset({"http"})
_MA = frozenset({"mqtt", "amqp"})
_AMQP = frozenset({"amqp"})

R, T, C, K = Action.RETRY, Action.THROTTLE, Action.RECONNECT, Action.REFRESH_CREDENTIALS
W, Q, I, S, F = (
    Action.WAIT_FOR_DEVICE,
    Action.WAIT_FOR_QUOTA_RESET,
    Action.STOP_IDENTITY_CONFLICT,
    Action.STOP,
    Action.FAIL,
)

# (code, name, action, transports, description[, extras]). extras: http=False (no HTTP form),
# aliases=(...), alias_codes=(...). Descriptions are ours; numbers and names are IoT Hub's.
_IOTHUB_ROWS: tuple[tuple, ...] = (  # type: ignore[type-arg]
    (400000, "GenericBadRequest", F, _DEV, "The request was malformed; no finer code was given."),
    (400001, "InvalidProtocolVersion", F, _DEV, "The protocol or API version is not one the hub accepts."),
    (400002, "DeviceInvalidResultCount", F, _SVC, "A registry query returned an unexpected number of devices."),
    (400003, "InvalidOperation", F, _DEV, "The operation is not valid in this context."),
    (400004, "ArgumentInvalid", F, _DEV, "A header, property or body field has an invalid value."),
    (400005, "ArgumentNull", F, _DEV, "A required argument is missing."),
    (400006, "IotHubFormatError", F, _DEV, "The body could not be parsed in the format the hub expects."),
    (400007, "DeviceStorageEntitySerializationError", F, _SVC, "The stored device entity could not be serialized."),
    (400008, "BlobContainerValidationError", F, _SVC, "The blob container for import or export failed validation."),
    (400009, "ImportWarningExistsError", F, _SVC, "A device import finished with warnings."),
    (400010, "InvalidSchemaVersion", F, _SVC, "The schema version in the request is not supported."),
    (400011, "DeviceDefinedMultipleTimes", F, _SVC, "The same device appears more than once in a bulk request."),
    (400012, "DeserializationError", F, _DEV, "The request body could not be deserialized."),
    (400013, "BulkRegistryOperationFailure", F, _SVC, "At least one device in a bulk registry operation failed."),
    (400014, "DefaultStorageEndpointNotConfigured", F, _DEV, "File upload needs a storage account linked to the hub."),
    (400015, "InvalidFileUploadCorrelationId", F, _DEV, "The file upload correlation id is not valid."),
    (400016, "ExpiredFileUploadCorrelationId", F, _DEV, "The file upload correlation id has expired."),
    (400017, "InvalidStorageEndpoint", F, _SVC, "The storage endpoint is not valid."),
    (400018, "InvalidMessagingEndpoint", F, _SVC, "The messaging endpoint is not valid."),
    (400019, "InvalidFileUploadCompletionStatus", F, _DEV, "The file upload completion status is not valid."),
    (400020, "InvalidStorageEndpointOrBlob", F, _SVC, "The storage endpoint or blob name is not valid."),
    (400021, "RequestCanceled", R, _DEV, "The service cancelled the request; a retry usually succeeds."),
    (400022, "InvalidStorageEndpointProperty", F, _SVC, "A storage endpoint property is not valid."),
    (400023, "EtagDoesNotMatch", F, _SVC, "The etag in the request does not match the resource's current etag."),
    (400024, "RequestTimedOut", R, _DEV, "The service timed out processing the request; retry."),
    (400025, "UnsupportedOperationOnReplica", F, _SVC, "The operation is not supported on a replica hub."),
    (400026, "NullMessage", F, _DEV, "The message is empty."),
    (400027, "ConnectionForcefullyClosedOnNewConnection", I, _MA,
     "Another client connected with the same identity, so the hub closed this connection.", {"http": False}),
    (400028, "InvalidDeviceScope", F, _SVC, "The device scope (parent edge device) is not valid."),
    (400029, "ConnectionForcefullyClosedOnFaultInjection", C, _MA,
     "The hub closed the connection during a service upgrade; reconnect at once.", {"http": False}),
    (400030, "ConnectionRejectedOnFaultInjection", C, _MA,
     "The hub rejected the connection during a service upgrade; reconnect.", {"http": False}),
    (400031, "InvalidEndpointAuthenticationType", F, _SVC, "The endpoint's authentication type is not valid."),
    (400032, "ManagedIdentityNotEnabled", F, _SVC, "The hub's managed identity is not enabled."),
    (400035, "InvalidPolicyKey", F, _SVC, "The shared access policy key is not valid."),
    (400036, "BulkRegenerateDeviceKeyOperationFailure", F, _SVC, "A bulk device key regeneration failed."),
    (400100, "InvalidRouteTestInput", F, _SVC, "The route test input is not valid."),
    (400101, "InvalidSourceOnRoute", F, _SVC, "The route's source is not valid."),
    (400102, "RoutingNotEnabled", F, _SVC, "Message routing is not enabled on this hub."),
    (400103, "InvalidContentEncodingOrType", F, _DEV, "The message's content encoding or content type is not valid."),
    (400301, "CannotRegisterModuleToModule", F, _SVC, "A module cannot be registered to another module."),
    (400302, "TenantHubRoutingNotEnabled", F, _SVC, "Routing is not enabled for this tenant hub."),
    (400401, "InvalidConfigurationTargetCondition", F, _SVC, "The configuration's target condition is not valid."),
    (400402, "InvalidConfigurationContent", F, _SVC, "The configuration's content is not valid."),
    (400403, "CannotModifyImmutableConfigurationContent", F, _SVC, "The configuration's content cannot be changed."),
    (400404, "InvalidConfigurationCustomMetricsQuery", F, _SVC, "A configuration metrics query is not valid."),
    (400501, "InvalidPnPInterfaceDefinition", F, _SVC, "The Plug and Play interface definition is not valid."),
    (400502, "InvalidPnPDesiredProperties", F, _DEV, "The Plug and Play desired properties are not valid."),
    (400503, "InvalidPnPReportedProperties", F, _DEV, "The Plug and Play reported properties are not valid."),
    (400504, "InvalidPnPWritableReportedProperties", F, _DEV, "The Plug and Play writable reported properties are not valid."),
    (400505, "InvalidDigitalTwinJsonPatch", F, _SVC, "The digital twin JSON patch is not valid."),
    (400506, "InvalidDigitalTwinPayload", F, _SVC, "The digital twin payload is not valid."),
    (400507, "InvalidDigitalTwinPatch", F, _SVC, "The digital twin patch is not valid."),
    (400508, "InvalidDigitalTwinPatchPath", F, _SVC, "A path in the digital twin patch is not valid."),
    (401000, "GenericUnauthorized", K, _DEV, "The credential was refused; no finer code was given."),
    (401001, "IotHubNotFound", S, _DEV, "The hub named in the request does not exist."),
    (401002, "IotHubUnauthorizedAccess", S, _DEV, "The credential has no right to this operation: a permanent refusal."),
    (401003, "IotHubUnauthorized", K, _DEV,
     "The token is expired or does not match; renew it, then reconnect.",),
    (401004, "ElasticPoolNotFound", S, _SVC, "The elastic pool does not exist."),
    (401100, "SystemModuleModifyUnauthorizedAccess", S, _SVC, "System modules cannot be changed with this credential."),
    (403000, "GenericForbidden", F, _DEV, "The request is forbidden; no finer code was given."),
    (403001, "IotHubSuspended", S, _DEV, "The hub is suspended."),
    (403002, "IotHubQuotaExceeded", Q, _DEV,
     "The hub's daily message quota is used up; sending resumes after the reset at 00:00 UTC.",
     {"aliases": ("QuotaExceeded",)}),
    (403003, "JobQuotaExceeded", F, _SVC, "Too many jobs are running on the hub."),
    (403004, "DeviceMaximumQueueDepthExceeded", F, _DEV,
     "The device's cloud-to-device queue is full until the device completes its messages."),
    (403005, "IotHubMaxCbsTokenExceeded", C, _AMQP, "Too many claims-based security tokens on this connection."),
    (403006, "DeviceMaximumActiveFileUploadLimitExceeded", R, _DEV,
     "The device has too many file uploads in progress; retry once some complete."),
    (403007, "DeviceMaximumQueueSizeExceeded", F, _DEV, "The device's cloud-to-device queue is over its size limit."),
    (403008, "RoutingEndpointResponseForbidden", F, _SVC, "A routing endpoint refused the request."),
    (403009, "InvalidMessageExpiryTime", F, _DEV, "The message's expiry time is not valid."),
    (403010, "OperationNotAvailableInCurrentTier", S, _DEV, "The hub's tier does not offer this operation."),
    (403011, "KeyEncryptionKeyRevoked", S, _SVC, "The hub's customer-managed key has been revoked."),
    (403012, "DeviceDisabled", S, _DEV, "The device is disabled in the registry."),
    (403100, "DeviceModelMaxPropertiesExceeded", F, _DEV, "The device model has too many properties."),
    (403101, "DeviceModelMaxIndexablePropertiesExceeded", F, _DEV, "The device model has too many indexable properties."),
    (403800, "DeviceMaximumInflightMethodExceeded", T, _SVC,
     "Too many direct method calls are in flight to this device; slow down."),
    (404000, "GenericNotFound", F, _DEV, "The resource was not found; no finer code was given."),
    (404001, "DeviceNotFound", S, _DEV, "The device is not registered in the hub."),
    (404002, "JobNotFound", F, _SVC, "The job does not exist."),
    (404004, "QuotaMetricNotFound", F, _SVC, "The quota metric does not exist."),
    (404005, "SystemPropertyNotFound", F, _DEV, "A system property named in the request does not exist."),
    (404006, "AmqpAddressNotFound", F, _AMQP, "The AMQP address of the link does not exist."),
    (404007, "RoutingEndpointResponseNotFound", F, _SVC, "A routing endpoint was not found."),
    (404008, "CertificateNotFound", F, _SVC, "The certificate does not exist."),
    (404009, "ElasticPoolTenantHubNotFound", F, _SVC, "The elastic pool tenant hub does not exist."),
    (404010, "ModuleNotFound", S, _DEV, "The module is not registered on the device."),
    (404011, "AzureTableStoreNotFound", F, _SVC, "The table store does not exist."),
    (404012, "IotHubFailingOver", R, _DEV, "The hub is failing over to another region; retry."),
    (404013, "FeatureNotSupported", F, _DEV, "The hub does not support this feature."),
    (404014, "DigitalTwinInterfaceNotFound", F, _SVC, "The digital twin interface does not exist."),
    (404101, "QueryStoreClusterNotFound", F, _SVC, "The query store cluster was not found."),
    (404103, "DeviceNotOnline", W, _SVC,
     "The target device is not connected (or not subscribed to methods); try again once it is online.",
     {"alias_codes": (404102,)}),
    (404104, "DeviceConnectionClosedRemotely", C, _MA,
     "The connection was closed by the other end (token expiry, network loss or a hub fault); reconnect."),
    (404301, "ConfigurationNotFound", F, _SVC, "The configuration does not exist."),
    (404302, "GroupNotFound", F, _SVC, "The group does not exist."),
    (404401, "DigitalTwinModelNotFound", F, _SVC, "The digital twin model does not exist."),
    (404402, "InterfaceNameModelNotFound", F, _SVC, "The interface name model does not exist."),
    (405000, "GenericMethodNotAllowed", F, _DEV, "The HTTP method is not allowed; no finer code was given."),
    (405102, "OperationNotAllowedInCurrentState", F, _SVC, "The operation is not allowed in the resource's current state."),
    (405103, "ImportDevicesNotSupported", F, _SVC, "Importing devices is not supported on this hub."),
    (405104, "BulkAddDevicesNotSupported", F, _SVC, "Adding devices in bulk is not supported on this hub."),
    (409000, "GenericConflict", F, _DEV, "The request conflicts with the resource's state; no finer code was given."),
    (409001, "DeviceAlreadyExists", F, _SVC, "A device with this id is already registered."),
    (409002, "LinkCreationConflict", I, _MA,
     "A second link or connection was opened for the same identity, so the hub closed the older one.",
     {"http": False}),
    (409003, "CallbackSubscriptionConflict", F, _SVC, "A callback subscription conflicts with an existing one."),
    (409101, "ModelAlreadyExists", F, _SVC, "The model already exists.", {"alias_codes": (409004,)}),
    (409102, "DeviceLocked", R, _SVC, "The device is locked by another operation; retry later.", {"alias_codes": (409005,)}),
    (409103, "DeviceJobAlreadyExists", F, _SVC, "A job for this device already exists.", {"alias_codes": (409006,)}),
    (409104, "JobAlreadyExists", F, _SVC, "The job already exists.", {"alias_codes": (409007,)}),
    (409301, "ModuleAlreadyExistsOnDevice", F, _SVC, "A module with this id already exists on the device."),
    (409401, "ConfigurationAlreadyExists", F, _SVC, "The configuration already exists."),
    (409402, "ApplyConfigurationAlreadyInProgressOnDevice", F, _SVC, "A configuration is already being applied to the device."),
    (409501, "DigitalTwinModelAlreadyExists", F, _SVC, "The digital twin model already exists."),
    (409502, "DigitalTwinModelExistsWithOtherModelType", F, _SVC, "A digital twin model with another type already exists."),
    (409503, "InterfaceNameModelAlreadyExists", F, _SVC, "The interface name model already exists."),
    (412000, "GenericPreconditionFailed", F, _DEV, "A precondition failed; no finer code was given."),
    (412001, "PreconditionFailed", F, _DEV, "The etag or version in the request does not match the resource."),
    (412002, "DeviceMessageLockLost", F, _AMQP,
     "The cloud-to-device message's lock expired before it was settled; receive it again.", {"http": False}),
    (412003, "JobRunPreconditionFailed", F, _SVC, "The job cannot run in its current state."),
    (412004, "InflightMessagesInLink", R, _AMQP, "Messages are still in flight on the link; retry once they settle."),
    (413000, "GenericRequestEntityTooLarge", F, _DEV, "The request is too large; no finer code was given."),
    (413001, "MessageTooLarge", F, _DEV, "The message is larger than the hub accepts (256 KiB for device-to-cloud)."),
    (413002, "TooManyDevices", F, _SVC, "The request names too many devices."),
    (413003, "TooManyModulesOnDevice", F, _SVC, "The device has too many modules."),
    (413101, "ConfigurationCountLimitExceeded", F, _SVC, "The hub has too many configurations.", {"alias_codes": (413004,)}),
    (413201, "DigitalTwinModelCountLimitExceeded", F, _SVC, "The hub has too many digital twin models.", {"alias_codes": (413005,)}),
    (413202, "InterfaceNameCompressionModelCountLimitExceeded", F, _SVC,
     "The hub has too many interface name compression models.", {"alias_codes": (413006,)}),
    (415000, "GenericUnsupportedMediaType", F, _DEV, "The media type is not supported; no finer code was given."),
    (415101, "IncompatibleDataType", F, _SVC, "The data type is not compatible.", {"alias_codes": (415001,)}),
    (429000, "GenericTooManyRequests", T, _DEV, "The request was throttled; no finer code was given."),
    (429001, "ThrottlingException", T, _DEV,
     "The hub throttled the operation; back off and retry.", {"aliases": ("Throttled", "IotHubThrottled")}),
    (429002, "ThrottleBacklogLimitExceeded", T, _DEV, "The throttle backlog is full; the hub may also disconnect the device."),
    (429003, "ThrottlingBacklogTimeout", T, _DEV, "A throttled request waited in the backlog too long; back off and retry."),
    (429004, "ThrottlingMaxActiveJobCountExceeded", T, _SVC, "Too many jobs are active; retry when some finish."),
    (429005, "DeviceThrottlingLimitExceeded", T, _DEV, "This device exceeded its own throttle; back off and retry."),
    (499000, "ClientClosedRequest", R, _DEV, "The client closed the request before the hub answered; retry."),
    (500001, "ServerError", R, _DEV, "The hub had an internal error; usually transient, retry with backoff."),
    (500008, "GenericTimeout", R, _DEV, "The hub timed out internally; retry."),
    (500301, "ModelRepoEndpointError", R, _SVC, "The model repository endpoint failed."),
    (500302, "ResolutionError", R, _SVC, "A model could not be resolved; retry."),
    (500401, "UnableToFetchCredentials", R, _SVC, "The hub could not fetch credentials."),
    (500402, "UnableToFetchTenantInfo", R, _SVC, "The hub could not fetch tenant information."),
    (500403, "UnableToShareIdentity", R, _SVC, "The hub could not share an identity."),
    (500501, "UnableToExpandDiscoveryInfo", R, _SVC, "The hub could not expand discovery information."),
    (500502, "UnableToExpandComponentInfo", R, _SVC, "The hub could not expand component information."),
    (500503, "UnableToCompressComponentInfo", R, _SVC, "The hub could not compress component information."),
    (500504, "UnableToCompressDiscoveryInfo", R, _SVC, "The hub could not compress discovery information."),
    (500505, "OrphanDiscoveryDocument", R, _SVC, "A discovery document has no owner."),
    (502000, "GenericBadGateway", R, _DEV, "A gateway in front of the hub got a bad answer; retry."),
    (503000, "GenericServiceUnavailable", R, _DEV, "The service is unavailable; no finer code was given, retry."),
    (503001, "ServiceUnavailable", R, _DEV, "The hub is temporarily unavailable; retry with backoff."),
    (503003, "PartitionNotFound", R, _DEV, "A hub partition was not available; retry with backoff."),
    (503004, "IotHubActivationFailed", R, _SVC, "The hub could not be activated."),
    (503005, "ServerBusy", R, _DEV, "The hub is busy; retry with backoff."),
    (503006, "IotHubRestoring", R, _DEV, "The hub is being restored; retry later."),
    (503008, "ReceiveLinkOpensThrottled", T, _AMQP, "Receive links are opened too fast; back off and retry."),
    (503101, "ConnectionUnavailable", R, _DEV, "The hub could not serve the connection; retry."),
    (503102, "DeviceUnavailable", R, _DEV, "The device's partition is temporarily unavailable; retry."),
    (503201, "ConfigurationNotAvailable", R, _SVC, "The configuration is temporarily unavailable; retry."),
    (503202, "GroupNotAvailable", R, _SVC, "The group is temporarily unavailable; retry."),
    (503301, "HostingServiceNotAvailable", R, _SVC, "A hosting service is unavailable; retry."),
    (504000, "GenericGatewayTimeout", R, _DEV, "A gateway timed out; no finer code was given, retry."),
    (504101, "GatewayTimeout", W, _SVC,
     "The target device did not answer a method or twin request in time; retry once it is online."),
)

# The C# SDK numbered these ten PnP codes 500026-500035 before the hub renumbered them.
_CSHARP_500 = (500301, 500302, 500401, 500402, 500403, 500501, 500502, 500503, 500504, 500505)

_NETWORK = frozenset({"http", "mqtt", "amqp"})

# Codes defined by this gateway for failures that are not protocol answers (no HTTP form).
_GATEWAY_ROWS: tuple[tuple, ...] = (  # type: ignore[type-arg]
    (400901, "ProtocolViolation", C, _NETWORK,
     "The peer broke the protocol (malformed packet, framing or session error); open a new connection."),
    (401901, "TlsVerificationFailed", S, _NETWORK,
     "The server's TLS certificate could not be verified: fix the trust store or host name, do not retry."),
    (500901, "UnclassifiedTransportError", R, _NETWORK,
     "The transport library failed in a way no table covers; retried with backoff, within the limits."),
    (503901, "ConnectionRefused", C, _NETWORK, "Nothing accepted the connection at the address; reconnect with backoff."),
    (503902, "NameResolutionFailed", C, _NETWORK, "The host name could not be resolved; reconnect with backoff."),
    (503903, "NetworkUnreachable", C, _NETWORK, "The network or host is unreachable; reconnect with backoff."),
    (503904, "NotConnected", C, _NETWORK, "The operation was attempted while the connection was down."),
    (503905, "TlsHandshakeFailed", C, _NETWORK, "The TLS handshake failed for a reason other than verification."),
    (503906, "Redirected", C, _NETWORK, "The peer asked the client to use another server or address."),
    (504901, "OperationTimedOut", R, _NETWORK,
     "No answer arrived before the operation's deadline; its outcome is unknown."),
)

# Standard HTTP statuses (RFC 9110 and friends, plus 449 Retry With) with the action of a bare status.
_STATUS_PHRASES: tuple[tuple[int, str, Action], ...] = (
    (300, "Multiple Choices", F), (301, "Moved Permanently", F), (302, "Found", F), (303, "See Other", F),
    (304, "Not Modified", F), (305, "Use Proxy", F), (307, "Temporary Redirect", F),
    (308, "Permanent Redirect", F),
    (400, "Bad Request", F), (401, "Unauthorized", K), (402, "Payment Required", F), (403, "Forbidden", F),
    (404, "Not Found", F), (405, "Method Not Allowed", F), (406, "Not Acceptable", F),
    (407, "Proxy Authentication Required", S), (408, "Request Timeout", R), (409, "Conflict", F),
    (410, "Gone", F), (411, "Length Required", F), (412, "Precondition Failed", F),
    (413, "Content Too Large", F), (414, "URI Too Long", F), (415, "Unsupported Media Type", F),
    (416, "Range Not Satisfiable", F), (417, "Expectation Failed", F), (418, "Im A Teapot", F),
    (421, "Misdirected Request", C), (422, "Unprocessable Content", F), (423, "Locked", R),
    (424, "Failed Dependency", F), (425, "Too Early", R), (426, "Upgrade Required", F),
    (428, "Precondition Required", F), (429, "Too Many Requests", T),
    (431, "Request Header Fields Too Large", F), (449, "Retry With", R),
    (451, "Unavailable For Legal Reasons", S), (499, "Client Closed Request", R),
    (500, "Internal Server Error", R), (501, "Not Implemented", F), (502, "Bad Gateway", R),
    (503, "Service Unavailable", R), (504, "Gateway Timeout", R), (505, "HTTP Version Not Supported", F),
    (506, "Variant Also Negotiates", F), (507, "Insufficient Storage", R), (508, "Loop Detected", F),
    (510, "Not Extended", F), (511, "Network Authentication Required", R),
)


def _build() -> tuple[dict[int, CodeInfo], dict[int, int], dict[str, int]]:
    table: dict[int, CodeInfo] = {}
    for row in _IOTHUB_ROWS:
        code, name, action, transports, description = row[:5]
        extra = row[5] if len(row) > 5 else {}
        alias_codes = tuple(extra.get("alias_codes", ()))
        if code in _CSHARP_500:
            alias_codes += (500026 + _CSHARP_500.index(code),)
        table[code] = CodeInfo(
            code=code,
            name=name,
            http_status=code // 1000 if extra.get("http", True) else None,
            transports=transports,
            action=action,
            description=description,
            aliases=tuple(extra.get("aliases", ())),
            alias_codes=alias_codes,
        )
    for code, name, action, transports, description in _GATEWAY_ROWS:
        table[code] = CodeInfo(code, name, None, transports, action, description, origin="gateway")
    for status, phrase, action in _STATUS_PHRASES:
        if status * 1000 in table:
            continue
        table[status * 1000] = CodeInfo(
            code=status * 1000,
            name="Generic" + "".join(w[:1].upper() + w[1:] for w in phrase.replace("-", " ").split()),
            http_status=status,
            transports=_SVC,
            action=action,
            description=f"HTTP {status} {phrase} with no IoT Hub code, e.g. from a proxy.",
            origin="gateway",
        )
    aliases: dict[int, int] = {}
    names: dict[str, int] = {}
    for info in table.values():
        for alias in info.alias_codes:
            aliases[alias] = info.code
        for name in (info.name, *info.aliases):
            names[name.lower()] = info.code
    return dict(sorted(table.items())), aliases, names


_TABLE, _ALIAS_CODES, _NAMES = _build()
CATALOG: Final = MappingProxyType(_TABLE)
_STATUS_ACTION: Final = {status: action for status, _, action in _STATUS_PHRASES}


def all_codes() -> Iterator[CodeInfo]:
    """Every row of the table, in code order."""
    return iter(_TABLE.values())


def parse_code(value: object) -> int:
    """Validate a six-digit code (int or digit string) of the form ``status * 1000 + n``.

    Raises ``ValueError`` naming the input (a bounded repr) when it is not one. Statuses 100-299 are
    not errors, so their codes are rejected too. Hostile input (a str or int subclass whose methods
    raise, an int too long to print) gets the same ``ValueError``: only the real type is looked at.
    """
    kind = type(value)
    if issubclass(kind, str):
        text = str.__str__(value).strip()  # type: ignore[arg-type]
        if not (len(text) == 6 and text.isascii() and text.isdigit()):
            raise ValueError(f"not a six-digit IoT Hub error code: {_show(text)}")
        number = int(text)
    elif issubclass(kind, int) and not issubclass(kind, bool):
        number = int.__int__(value)  # type: ignore[arg-type]
    else:
        raise ValueError(f"not a six-digit IoT Hub error code: {_show(value)}")
    if not 300_000 <= number <= 599_999:
        raise ValueError(f"not a six-digit IoT Hub error code (status 300-599 * 1000 + n): {_show(value)}")
    return number


def _show(value: object) -> str:
    """A bounded repr that never raises (a hostile ``__repr__``, an int too long to print)."""
    try:
        text = repr(value)
        if type(text) is not str:
            raise TypeError("__repr__ returned a non-str")
    except Exception:
        return f"<unprintable {type(value).__name__[:40]}>"
    return text if len(text) <= 80 else text[:80] + "..."


def family(status: int) -> CodeInfo:
    """The generic row for an HTTP status 300-599: ``status * 1000``, known or synthesized."""
    if not 300 <= status <= 599:
        raise ValueError(f"not an error HTTP status (300-599): {status!r}")
    row = _TABLE.get(status * 1000)
    if row is not None:
        return row
    # A status no standard names (420, 509, 520 ...): the class decides, as HTTP itself says.
    action = F if status < 500 else R
    return CodeInfo(
        code=status * 1000,
        name=f"HttpStatus{status}",
        http_status=status,
        transports=_SVC,
        action=action,
        description=f"HTTP {status}, a status no standard or IoT Hub table names.",
        origin="gateway",
        known=False,
    )


def lookup(value: object) -> CodeInfo:
    """The catalog row for a code or alias number; an unlisted code resolves to its status family's row.

    An error never carries a code the catalog does not list. A six-digit number in ``300000``-``599999``
    that is neither a code nor an alias (``429999``) stands for its status's generic code: the result
    is the family row (``code`` ``429000``, its name and action) flagged ``known=False``, and every
    translator that builds an error from it marks the error inexact and keeps the number it was given in
    ``native``. Why: the catalog is the one table (``/v1/codes`` lists every code a caller can see, and
    a consumer's ``switch`` on codes stays complete); the action would be the family's anyway; and an
    upstream that invents codes cannot grow the set of codes (metric labels, outbox values) past one
    per status. Like an alias number, the asked-for number is therefore not the result's ``code``.
    Raises ``ValueError`` for anything :func:`parse_code` refuses.
    """
    number = parse_code(value)
    row = _TABLE.get(number)
    if row is not None:
        return row
    canonical = _ALIAS_CODES.get(number)
    if canonical is not None:
        return _TABLE[canonical]
    base = family(number // 1000)
    return base if not base.known else replace(base, known=False)


def code_of(name: str) -> int:
    """The number of a code named in the table; a ``KeyError`` at import time catches a typo.

    Modules that map wire forms to codes name them this way, so no number is written twice.
    """
    code = _NAMES.get(name.lower())
    if code is None:
        raise KeyError(f"no code named {name!r} in the catalog")
    return code


def by_name(name: str) -> CodeInfo | None:
    """The row for a code name or alias (case-insensitive), or None."""
    code = _NAMES.get(name.strip().lower())
    return _TABLE[code] if code is not None else None


def for_status(status: int) -> CodeInfo:
    """The code for a bare HTTP error status with nothing finer said: its generic ``status * 1000``."""
    return family(status)


def status_action(status: int) -> Action | None:
    """The documented action of a bare standard status, or None for a non-standard one."""
    return _STATUS_ACTION.get(status)
