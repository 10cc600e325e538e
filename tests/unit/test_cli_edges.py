"""Issue 16's rough edges on the command line: ``token add`` keeps an existing token unless told,
``certs --clients`` gives each client its own certificate, ``merge`` reads the cut from the adapters."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from huggingface_hub import ModelCard

import fedsea
from fedsea.cli.main import main
from fedsea.wire.auth import TokenStore
from tests.unit.test_cli_bad_inputs import one_line_error


def test_token_add_refuses_an_existing_name_unless_replace(tmp_path, capsys):
    tokens = str(tmp_path / "tokens.json")
    assert main(["token", "add", tokens, "clinic-a"]) == 0
    first = capsys.readouterr().out.strip()
    one_line_error(capsys, ["token", "add", tokens, "clinic-a"], "already has a token for 'clinic-a'", "--replace")
    assert TokenStore.load(tokens).authenticate(first) == "clinic-a"  # nothing lost
    assert main(["token", "add", tokens, "clinic-a", "--replace"]) == 0
    second = capsys.readouterr().out.strip()
    store = TokenStore.load(tokens)
    assert store.authenticate(second) == "clinic-a" and second != first
    with pytest.raises(Exception, match="unknown token"):
        store.authenticate(first)


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    return cert.issuer == ca.subject


@pytest.mark.parametrize(("given", "names"), [(["3"], ["client-0", "client-1", "client-2"]), (["a", "b"], ["a", "b"])])
def test_certs_makes_one_client_certificate_per_client(tmp_path, capsys, given, names):
    assert main(["certs", str(tmp_path), "--clients", *given]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    for name in names:
        cert = x509.load_pem_x509_certificate((tmp_path / "clients" / f"{name}.pem").read_bytes())
        common_name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert common_name == name and _signed_by(cert, ca)
        assert (tmp_path / "clients" / f"{name}.key").stat().st_mode & 0o077 == 0
    assert sorted(p.stem for p in (tmp_path / "clients").glob("*.pem")) == sorted(names)
    one_line_error(capsys, ["certs", str(tmp_path / "x"), "--clients", "a", "a"], "names a client twice")


def test_merge_reads_the_cut_from_the_adapters(tmp_path):
    split = fedsea.split_model(fedsea.tiny_llama(), 1, 2).add_lora(fedsea.LoraSpec(r=2))
    split.save_adapters(tmp_path / "adapters")
    assert main(["merge", str(tmp_path / "adapters"), str(tmp_path / "out"), "--model", "tiny-llama"]) == 0
    assert "| Cut (p, q) | (1, 2) |" in ModelCard.load(tmp_path / "out" / "README.md").text


def test_help_names_every_flags_default(capsys):
    import argparse

    from fedsea.cli.main import build_parser

    def walk(parser: argparse.ArgumentParser, where: str) -> list[str]:
        missing = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    missing += walk(child, f"{where} {name}")
            elif (
                action.option_strings
                and action.default not in (None, False, [], argparse.SUPPRESS)
                and "default" not in (action.help or "").lower()
            ):
                missing.append(f"{where} {action.option_strings[0]}")
        return missing

    assert walk(build_parser(), "fedsea") == []
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--port PORT           (default: 50051)" in capsys.readouterr().out
