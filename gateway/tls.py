"""One way to say how a transport secures its socket, the same on HTTP, MQTT and AMQP.

Every transport takes ``host``, ``port`` and ``ssl``. ``ssl`` is an :class:`ssl.SSLContext` (use
:func:`client_context` to trust a private CA, such as the bundled emulator's), ``True`` for the system's
trust store (the default: IoT Hub is always TLS), or ``None`` / ``False`` for plain TCP, which only a
loopback peer such as the emulator or a local broker should ever be given.
"""

from __future__ import annotations

import ssl as _ssl
from typing import TypeAlias

__all__ = ["TlsSetting", "client_context", "default_port", "resolve"]

#: What a transport's ``ssl=`` accepts.
TlsSetting: TypeAlias = "_ssl.SSLContext | bool | None"


def client_context(ca_file: str | None = None, *, check_hostname: bool = True) -> _ssl.SSLContext:
    """A client context that verifies the peer: the system trust store, plus ``ca_file`` if given.

    ``check_hostname=False`` still verifies the chain; use it when connecting to an IP address whose
    certificate names only a host name.
    """
    context = _ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    context.check_hostname = check_hostname
    return context


def resolve(setting: _ssl.SSLContext | bool | None) -> _ssl.SSLContext | None:
    """The context a transport uses: ``True`` -> a system-trust context, ``False``/``None`` -> plain TCP."""
    if isinstance(setting, _ssl.SSLContext):
        return setting
    if setting is True:
        return client_context()
    if setting is None or setting is False:
        return None
    raise TypeError(f"ssl must be an ssl.SSLContext, True or None, not {type(setting).__name__}")


def default_port(transport: str, context: _ssl.SSLContext | None) -> int:
    """IoT Hub's port for ``transport`` (with TLS), or the plain-TCP port a local peer listens on."""
    ports = {"mqtt": (8883, 1883), "amqp": (5671, 5672), "http": (443, 80)}
    secure, plain = ports[transport]
    return secure if context is not None else plain
