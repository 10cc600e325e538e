"""What a failed connection most likely means, and the flag that fixes it.

gRPC reports every failure to connect as ``UNAVAILABLE: failed to connect to all addresses``
followed by the transport's own words (``Connection refused``, an OpenSSL reason, ``Socket
closed``), and a refused token as ``UNAUTHENTICATED``. Those words are enough to tell the usual
mistakes apart, together with what this client was told to use (TLS or not, a client certificate
or not, a token or not): ``explain`` turns them into one line naming the likely cause and the fix,
and keeps gRPC's words after it for whoever needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedsea.client.connection import ClientTls

# gRPC's prefix of a failure to establish the connection (as opposed to one lost later).
CONNECT_FAILED = "failed to connect to all addresses"
UNTRUSTED_MARKS = ("certificate_verify_failed", "certificate signature failure", "bad_signature", "unknown ca")


def explain(code: str, details: str, address: str, tls: ClientTls | None, token: bool) -> str:
    """One line: the likely cause and fix of a failed call, then gRPC's own ``details``.

    Args:
        code: the gRPC status code's name.
        details: gRPC's details string.
        address: the server address the client dialled.
        tls: the client's TLS files (None: plaintext).
        token: whether the client sent a token.
    """
    hint = _hint(code, details.lower(), address, tls, token)
    return details if hint is None else f"{hint} (gRPC: {details})"


def _hint(code: str, low: str, address: str, tls: ClientTls | None, token: bool) -> str | None:
    if code == "UNAUTHENTICATED":
        if "missing token" in low:
            return (
                f"{address} requires a token: pass --token or set $FEDSEA_TOKEN (its operator makes one with "
                "`fedsea token add`)"
            )
        if "unknown token" in low:
            what = "--token / $FEDSEA_TOKEN" if token else "the token"
            return f"{address} does not know this token: check {what} (tokens are per server: `fedsea token add` there)"
        return None
    if code != "UNAVAILABLE" or CONNECT_FAILED not in low:
        return None
    if "connection refused" in low:
        return f"nothing is listening at {address}: start `fedsea serve` there, or check the host and port of --server"
    if "wrong_version_number" in low and tls is not None:
        return (
            f"{address} answers in plaintext, not TLS: drop --tls-ca to reach a plaintext server on loopback, "
            "or start the server with --tls-cert and --tls-key"
        )
    if any(mark in low for mark in UNTRUSTED_MARKS):
        ca = f" ({tls.ca})" if tls is not None and tls.ca is not None else ""
        return (
            f"the certificate of {address} is not signed by the CA given to --tls-ca{ca}: give the CA that signed "
            "the server's certificate (its ca.pem)"
        )
    if "peer name" in low or "hostname" in low:
        host = address.rsplit(":", 1)[0]
        return (
            f"the certificate of {address} is not valid for {host}: connect by a name it lists, or remake it "
            f"with `fedsea certs DIR --host {host}`"
        )
    if "socket closed" in low or "connection reset" in low:
        if tls is None:
            return (
                f"{address} closed the connection at once: it probably serves TLS; add --tls-ca (and --tls-cert "
                "and --tls-key if it requires client certificates)"
            )
        if tls.cert is None:
            return (
                f"{address} closed the TLS handshake: it probably requires a client certificate; add --tls-cert "
                "and --tls-key (`fedsea certs DIR --clients NAME` makes one per client)"
            )
        return (
            f"{address} closed the TLS handshake: it did not accept the client certificate {tls.cert} "
            "(signed by a CA the server does not trust?)"
        )
    return None
