"""Each way of failing to reach the trunk server ends in one line naming the likely cause and the
flag that fixes it (issue 16 item 5): real servers on loopback, real TLS certificates and tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import fedsea
from fedsea.client.connection import ClientTls
from fedsea.errors import RemoteError
from fedsea.server.app import ServerThread, ServerTls, TrunkServer
from fedsea.server.trunk import TrunkHost
from fedsea.wire.auth import TokenStore
from fedsea.wire.certs import CertPaths, make_test_certs
from fedsea.wire.ports import free_loopback_port


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[CertPaths, CertPaths]:
    root = tmp_path_factory.mktemp("certs")
    return make_test_certs(root / "ours"), make_test_certs(root / "other")


@pytest.fixture(scope="module")
def tokens() -> tuple[TokenStore, str]:
    store = TokenStore()
    return store, store.add("clinic-a")


def _server(tls: ServerTls | None, tokens: TokenStore | None) -> tuple[ServerThread, int]:
    thread = ServerThread(TrunkServer(TrunkHost(fedsea.tiny_llama()), tls=tls, tokens=tokens))
    return thread, thread.start()


@pytest.fixture(scope="module")
def mtls_port(certs, tokens) -> Iterator[int]:
    ours, _ = certs
    thread, port = _server(ServerTls(ours.server_cert, ours.server_key, ours.ca_cert), tokens[0])
    yield port
    thread.stop()


@pytest.fixture(scope="module")
def plain_port(tokens) -> Iterator[int]:
    thread, port = _server(None, tokens[0])
    yield port
    thread.stop()


def _error(port: int, tls: ClientTls | None, token: str | None) -> str:
    split = fedsea.split_model(fedsea.tiny_llama(), 1, 1)
    with (
        pytest.raises(RemoteError) as caught,
        fedsea.SplitClient(f"localhost:{port}", split, tls=tls, token=token, retries=0),
    ):
        pass
    message = str(caught.value)
    assert "\n" not in message
    return message


def _mtls(paths: CertPaths, ca: Path | None = None) -> ClientTls:
    return ClientTls(ca=ca or paths.ca_cert, cert=paths.client_cert, key=paths.client_key)


def test_a_server_wanting_a_client_certificate_says_add_tls_cert(mtls_port, certs, tokens):
    message = _error(mtls_port, ClientTls(ca=certs[0].ca_cert), tokens[1])
    assert "requires a client certificate" in message and "--tls-cert and --tls-key" in message


def test_an_unknown_ca_says_which_ca_flag_to_fix(mtls_port, certs, tokens):
    ours, other = certs
    message = _error(mtls_port, _mtls(ours, ca=other.ca_cert), tokens[1])
    assert "is not signed by the CA given to --tls-ca" in message and str(other.ca_cert) in message


def test_a_client_certificate_from_another_ca_is_named(mtls_port, certs, tokens):
    message = _error(mtls_port, _mtls(certs[1], ca=certs[0].ca_cert), tokens[1])
    assert "did not accept the client certificate" in message and str(certs[1].client_cert) in message


def test_plaintext_to_a_tls_port_says_add_tls_ca(mtls_port, tokens):
    message = _error(mtls_port, None, tokens[1])
    assert "probably serves TLS; add --tls-ca" in message


def test_tls_to_a_plaintext_port_says_so(plain_port, certs, tokens):
    message = _error(plain_port, ClientTls(ca=certs[0].ca_cert), tokens[1])
    assert "answers in plaintext, not TLS" in message


def test_nothing_listening_says_start_fedsea_serve(tokens):
    message = _error(free_loopback_port(), None, tokens[1])
    assert "nothing is listening at localhost:" in message and "fedsea serve" in message


@pytest.mark.parametrize(("token", "needle"), [("wrong", "does not know this token"), (None, "requires a token")])
def test_a_wrong_or_missing_token_says_which_flag(mtls_port, certs, token, needle):
    message = _error(mtls_port, _mtls(certs[0]), token)
    assert message.startswith("UNAUTHENTICATED") and needle in message and "--token" in message


def test_the_cli_prints_the_hint_on_one_line(capsys, tokens):
    from tests.unit.test_cli_bad_inputs import one_line_error

    argv = ["generate", "--server", f"127.0.0.1:{free_loopback_port()}", "--model", "tiny-llama"]
    argv += ["--head-layers", "1", "--tail-layers", "1", "--prompt", "hi"]
    one_line_error(capsys, argv, "nothing is listening at 127.0.0.1:", "fedsea serve")
