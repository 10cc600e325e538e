"""Identity (issue 14, item 6): no anonymous public server unless asked for, roles in the tokens
file, and GetStats' server-wide figures for operators only."""

from __future__ import annotations

import json
import subprocess

import pytest

import fedsea
from fedsea.server.app import ServerTls, TrunkServer
from fedsea.server.trunk import TrunkHost
from fedsea.wire.auth import TokenStore, hash_token
from fedsea.wire.certs import make_test_certs
from tests.integration.conftest import TINY
from tests.integration.test_cli_wire import ENV, FEDSEA
from tests.integration.test_generation import PROMPTS, _encode, _server_stats, _split


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_test_certs(tmp_path_factory.mktemp("certs"))


def test_a_public_bind_without_client_authentication_is_refused(certs):
    tls = ServerTls(certs.server_cert, certs.server_key)
    mutual = ServerTls(certs.server_cert, certs.server_key, client_ca=certs.ca_cert)
    with pytest.raises(ValueError, match="without client authentication"):
        TrunkServer.check_identity("0.0.0.0", tls, None, allow_anonymous=False)
    with pytest.raises(ValueError, match="--allow-anonymous"):
        TrunkServer.check_identity("10.1.2.3", None, None, allow_anonymous=False)
    TrunkServer.check_identity("0.0.0.0", tls, None, allow_anonymous=True)
    TrunkServer.check_identity("0.0.0.0", tls, TokenStore(), allow_anonymous=False)
    TrunkServer.check_identity("0.0.0.0", mutual, None, allow_anonymous=False)
    TrunkServer.check_identity("127.0.0.1", tls, None, allow_anonymous=False)
    TrunkServer.check_identity("::1", None, None, allow_anonymous=False)
    with pytest.raises(ValueError, match="without client authentication"):
        TrunkServer(TrunkHost(fedsea.tiny_llama(**TINY)), "0.0.0.0", tls=tls)


def test_serve_refuses_tls_on_a_public_address_without_client_authentication(certs):
    tls = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
    done = subprocess.run([*FEDSEA, "serve", "--model", "tiny-llama", "--host", "0.0.0.0", *tls], env=ENV,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "without client authentication" in line and "--allow-anonymous" in line
    assert "loading" not in done.stdout  # refused before the model is loaded


def test_token_roles_are_stored_and_old_files_still_load(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"clients": {"alice": hash_token("secret")}}))
    store = TokenStore.load(old)
    assert store.authenticate("secret") == "alice" and store.role("alice") == "client"
    operator = store.add("ops", role="operator")
    store.save(old)
    again = TokenStore.load(old)
    assert again.is_operator(again.authenticate(operator)) and not again.is_operator("alice")
    saved = json.loads(old.read_text())["clients"]
    assert saved["alice"] == hash_token("secret") and saved["ops"]["role"] == "operator"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"clients": {"x": {"hash": hash_token("t"), "role": "root"}}}))
    with pytest.raises(ValueError, match="role must be one of client, operator"):
        TokenStore.load(bad)
    # fedsea token add --operator
    tokens = tmp_path / "tokens.json"
    done = subprocess.run([*FEDSEA, "token", "add", str(tokens), "boss", "--operator"], env=ENV,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "operator token" in done.stderr
    assert TokenStore.load(tokens).is_operator(TokenStore.load(tokens).authenticate(done.stdout.strip()))


def test_get_stats_shows_server_wide_figures_to_an_operator_only(make_server, tiny_tokenizer):
    store = TokenStore()
    alice, bob, ops = store.add("alice"), store.add("bob"), store.add("ops", role="operator")
    enc, lengths = _encode(tiny_tokenizer, PROMPTS)
    with (
        make_server(tokens=store) as address,
        fedsea.SplitClient(address, _split(), tokenizer=tiny_tokenizer, token=alice) as a,
        fedsea.SplitClient(address, _split(), tokenizer=tiny_tokenizer, token=bob) as b,
        fedsea.SplitClient(address, _split(), tokenizer=tiny_tokenizer, token=ops) as operator,
    ):
        stepper = a.stepper(max_length=64)
        stepper.step(0, a.split.head(enc["input_ids"], lengths).detach(), lengths, None)
        own = _server_stats(a)
        assert own.generation_sessions == 1 and own.cache_bytes > 0  # its own figures
        assert own.server_cache_bytes == 0 and own.server_reserved_bytes == 0
        other = _server_stats(b)
        assert other.cache_bytes == 0 and other.server_cache_bytes == 0 and other.server_reserved_bytes == 0
        wide = _server_stats(operator)
        assert wide.cache_bytes == 0 and wide.server_cache_bytes == own.cache_bytes
        assert wide.server_reserved_bytes > 0
        stepper.close()
