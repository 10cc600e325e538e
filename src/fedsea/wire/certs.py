"""Throwaway certificates for test setups: a CA, a server and a client certificate.

``fedsea certs DIR`` writes ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key``,
``client.pem`` and ``client.key``; with ``--clients`` one more client certificate per name
(``clients/<name>.pem`` and ``.key``, each client its own identity). The server certificate is valid for ``localhost``,
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

from fedsea.errors import InvalidInputError
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


def add_client_certs(directory: str | os.PathLike[str], names: Sequence[str], days: int = 30) -> list[Path]:
    """Sign one client certificate per name with the CA in ``directory`` (``ca.pem``, ``ca.key``, as
    ``make_test_certs`` wrote them): ``clients/<name>.pem`` and ``clients/<name>.key`` (owner-only).

    Returns the certificate paths. Raises ``InvalidInputError`` for a name that is not a plain file
    name or a folder without the CA's files.
    """
    out = Path(directory)
    try:
        ca_cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise InvalidInputError("--clients", f"no readable CA in {out} (ca.pem, ca.key): {exc}") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise InvalidInputError("--clients", f"{out / 'ca.key'} is not the EC key fedsea certs writes")
    folder = out / "clients"
    folder.mkdir(exist_ok=True)
    written = []
    for name in names:
        if not name or "/" in name or name.startswith(".") or len(name) > 64:
            raise InvalidInputError("--clients", f"{name!r} is not a usable client name (a plain file name)")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(name, key, ca_cert.subject, ca_key, days, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
        atomic_write_bytes(folder / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
        atomic_write_bytes(folder / f"{name}.key", _key_pem(key))
        os.chmod(folder / f"{name}.key", 0o600)
        written.append(folder / f"{name}.pem")
    return written


def _read(flag: str, path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInputError(flag, f"cannot read {path}: {exc.strerror or exc}") from exc


def check_tls_files(
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    ca: str | os.PathLike[str] | None = None,
    flags: tuple[str, str, str] = ("--tls-cert", "--tls-key", "--tls-ca"),
) -> None:
    """Check TLS files before gRPC reads them: it logs C++ errors and raises an unrelated
    ``RuntimeError`` (server: "Failed to bind") or ``UNAVAILABLE`` (client) on a bad PEM.

    Args:
        cert: a PEM certificate (chain): the server's, or the client's for mutual TLS.
        key: the PEM private key of ``cert`` (unencrypted, as gRPC reads it).
        ca: one or more PEM CA certificates.
        flags: the command-line names of the three, used in the messages.

    Raises:
        InvalidInputError: naming the flag, for a file that is missing, not PEM of its kind,
            or (``key``) not the key of ``cert``.
    """
    cert_flag, key_flag, ca_flag = flags
    leaf: x509.Certificate | None = None
    for flag, path in ((cert_flag, cert), (ca_flag, ca)):
        if path is None:
            continue
        try:
            loaded = x509.load_pem_x509_certificates(_read(flag, path))
        except ValueError as exc:  # cryptography's message is a FAQ link: ours names the file
            raise InvalidInputError(flag, f"{path} is not a PEM certificate") from exc
        if flag == cert_flag:
            leaf = loaded[0]
    if key is None:
        return
    try:
        private = serialization.load_pem_private_key(_read(key_flag, key), password=None)
    except (ValueError, TypeError) as exc:  # TypeError: an encrypted key (gRPC takes none)
        raise InvalidInputError(key_flag, f"{key} is not an unencrypted PEM private key") from exc
    if leaf is not None:
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
            raise InvalidInputError(key_flag, f"{key} is not the private key of {cert_flag} {cert}")
