"""``fedsea generate --adapters DIR`` takes (p, q) from the saved adapters, as ``eval`` and ``merge`` do."""

from __future__ import annotations

import fedsea
from fedsea.cli.main import main
from fedsea.server.app import ServerThread, TrunkServer
from fedsea.server.trunk import TrunkHost


def test_generate_uses_the_cut_the_adapters_were_saved_with(tmp_path, capsys):
    # (1, 2) on the 4-block tiny model: the flags' own default (2, 2) would not even fit it.
    split = fedsea.split_model(fedsea.load_model("tiny-llama"), 1, 2).add_lora(fedsea.LoraSpec(r=2, dropout=0.0))
    split.save_adapters(tmp_path / "adapters")
    thread = ServerThread(TrunkServer(TrunkHost(fedsea.load_model("tiny-llama"))))
    port = thread.start()
    try:
        argv = ["generate", "--server", f"localhost:{port}", "--model", "tiny-llama"]
        argv += ["--adapters", str(tmp_path / "adapters"), "--prompt", "hi", "--max-new-tokens", "3", "--sigma", "0"]
        assert main(argv) == 0, capsys.readouterr().err
    finally:
        thread.stop()
    assert "noise on h_p (p=1)" in capsys.readouterr().err


def test_chat_handles_its_commands_itself_and_marks_a_cut_answer(tmp_path, capsys, monkeypatch):
    import io

    thread = ServerThread(TrunkServer(TrunkHost(fedsea.load_model("tiny-llama"))))
    port = thread.start()
    session = "/help\n/bogus\nhello there\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(session))
    try:
        argv = ["chat", "--server", f"localhost:{port}", "--model", "tiny-llama", "--head-layers", "1"]
        assert main([*argv, "--tail-layers", "1", "--max-new-tokens", "2", "--sigma", "0"]) == 0
    finally:
        thread.stop()
    out = capsys.readouterr().out
    assert out.count("model> ") == 1  # only "hello there" went to the model
    assert "/reset forgets the conversation" in out and "(unknown command /bogus; /help lists" in out
    assert "(answer cut at --max-new-tokens 2; raise it for longer answers)" in out
