"""TLS material for loopback tests: a throwaway CA and a server certificate for localhost/127.0.0.1."""

from __future__ import annotations

import pathlib
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trustme


@dataclass(frozen=True)
class TlsFiles:
    ca_pem: pathlib.Path  #: the CA a client must trust
    cert_pem: pathlib.Path  #: server certificate chain
    key_pem: pathlib.Path  #: server private key

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_pem, self.key_pem)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_pem))


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsFiles]:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    d = tmp_path_factory.mktemp("tls")
    files = TlsFiles(d / "ca.pem", d / "cert.pem", d / "key.pem")
    ca.cert_pem.write_to_path(str(files.ca_pem))
    cert.private_key_pem.write_to_path(str(files.key_pem))
    cert.cert_chain_pems[0].write_to_path(str(files.cert_pem))
    for extra in cert.cert_chain_pems[1:]:
        with files.cert_pem.open("ab") as fh:
            fh.write(extra.bytes())
    yield files
