"""Throwaway certificates for test setups: a CA, a server and a client certificate.

``fedsea certs DIR`` writes ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key``,
``client.pem`` and ``client.key``. The server certificate is valid for ``localhost``,
``127.0.0.1`` and ``::1`` (and any extra host names given). Not for production: real
deployments use their own PKI.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsea.io import atomic_write_bytes


@dataclass(frozen=True)
class CertPaths:
    """Where ``make_test_certs`` wrote the CA, server and client certificates and keys."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    days: int,
    *,
    ca: bool = False,
    sans: Sequence[x509.GeneralName] = (),
    usage: Sequence[x509.ObjectIdentifier] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usage)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_test_certs(
    directory: str | os.PathLike[str],
    hosts: Sequence[str] = (),
    client_name: str = "fedsea-client",
    days: int = 30,
) -> CertPaths:
    """Write a throwaway CA and a server and client certificate signed by it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("fedsea test CA", ca_key, _name("fedsea test CA"), ca_key, days, ca=True)
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(
        "localhost", server_key, ca_cert.subject, ca_key, days, sans=sans, usage=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _issue(
        client_name, client_key, ca_cert.subject, ca_key, days, usage=[ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    paths = CertPaths(*(out / n for n in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")))
    pem = serialization.Encoding.PEM
    atomic_write_bytes(paths.ca_cert, ca_cert.public_bytes(pem))
    atomic_write_bytes(paths.server_cert, server_cert.public_bytes(pem))
    atomic_write_bytes(paths.client_cert, client_cert.public_bytes(pem))
    for key, path in ((ca_key, paths.ca_key), (server_key, paths.server_key), (client_key, paths.client_key)):
        atomic_write_bytes(path, _key_pem(key))
        os.chmod(path, 0o600)
    return paths
