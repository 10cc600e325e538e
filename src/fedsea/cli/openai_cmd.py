"""``fedsea openai``: an OpenAI-compatible endpoint on this machine, generating through the split.

Module import is light (argparse only): torch, transformers, FastAPI and uvicorn load in the
command's function, so that ``fedsea --help`` stays fast.
"""

from __future__ import annotations

import argparse
import socket
import sys
from dataclasses import dataclass
from typing import Any

# What ``fedsea.cli.generate``'s client builder reads of the generation flags, which this
# command does not take (each request brings its own sampling parameters).
_GENERATION_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 1,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "seed": None,
    "stop": [],
    "no_cache": False,
    "no_chat_template": False,
}


def add_openai_command(sub: Any) -> None:
    """Register ``openai`` on the ``fedsea`` subparsers."""
    from fedsea.cli.flags import add_settings_flags
    from fedsea.cli.generate import _cut_from_adapters, add_connection_args, add_noise_args
    from fedsea.serving.settings import API_KEY_ENV, EndpointSettings

    cmd = sub.add_parser(
        "openai",
        help="serve OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models) on this machine, "
        "generating through the split: the text stays here",
        description="An OpenAI-compatible endpoint on this machine. Tokenization, head, tail and sampling run "
        "here; only the head's noised hidden states go to the trunk server. Point any OpenAI client at "
        "http://HOST:PORT/v1.",
    )
    add_connection_args(cmd)
    add_noise_args(cmd)
    cmd.add_argument(
        "--adapters",
        help="folder with head/, trunk/ and tail/ adapters, or a federated run's folder (its latest round) or "
        "round checkpoint (RUN/checkpoints/round-NNNN); with a run, --head-layers/--tail-layers default to the run's",
    )
    cmd.add_argument(
        "--base-trunk",
        action="store_true",
        help="with --adapters: the folder may lack trunk/ and the server's trunk runs without an adapter",
    )
    cmd.add_argument(
        "--speculative",
        metavar="DRAFTER",
        help="speculative decoding for every answer, several tokens per round trip to the trunk: 'prompt-lookup' "
        "'bridge:FILE' (`fedsea bridge train`) or a small draft model sharing the tokenizer (a --model source)",
    )
    cmd.add_argument("--draft-tokens", type=int, default=None,
                     help="with --speculative: at most this many per round trip (default: 10 for prompt-lookup, "
                     "6 for a model or bridge)")  # fmt: skip
    endpoint = cmd.add_argument_group("endpoint")
    add_settings_flags(endpoint, EndpointSettings())
    endpoint.add_argument(
        "--api-key-file",
        help=f"file holding the API key clients must send as 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; "
        "unset: no key, loopback only)",
    )
    # None: not given (then the cut --adapters records, as for ``fedsea chat``)
    cmd.set_defaults(func=_cmd_openai, head_layers=None, tail_layers=None)
    _cut_from_adapters(cmd)


@dataclass
class Endpoint:
    """An endpoint ready to serve: its ``SplitEngine`` (connected), FastAPI app, listening socket,
    model id and whether it requires an API key."""

    engine: Any
    app: Any
    sock: socket.socket
    name: str
    keyed: bool


def open_endpoint(args: argparse.Namespace) -> Endpoint:
    """The endpoint of parsed ``fedsea openai`` arguments, connected to the trunk server, not yet serving."""
    from fedsea.cli.flags import settings_from_flags
    from fedsea.serving.settings import EndpointSettings, check_exposure, read_api_key

    settings = settings_from_flags(args, EndpointSettings())
    api_key = read_api_key(args.api_key_file)
    check_exposure(settings.host, api_key)  # before anything loads

    from fedsea.cli.generate import _client, model_settings
    from fedsea.serving.app import bind, create_app
    from fedsea.serving.engine import SplitEngine

    try:
        sock = bind(settings.host, settings.port)  # a taken port fails before the trunk session opens
    except OSError as exc:
        raise ValueError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    try:
        # The split, its adapters (a folder, a run or a round checkpoint) and the noise, as for ``fedsea chat``.
        client, _ = _client(argparse.Namespace(**{**_GENERATION_DEFAULTS, **vars(args)}))
        engine = SplitEngine(
            client, settings.max_model_len, settings.default_max_tokens, settings.max_queue,
            speculative=args.speculative, num_draft_tokens=args.draft_tokens,
        ).start()  # fmt: skip
        name = settings.served_model_name or str(model_settings(args).source)
        app = create_app(engine, name, settings, api_key)
    except BaseException:
        sock.close()
        raise
    return Endpoint(engine, app, sock, name, api_key is not None)


def _cmd_openai(args: argparse.Namespace) -> int:
    from fedsea.serving.app import make_server

    endpoint = open_endpoint(args)
    server = make_server(endpoint.app)
    host, port = endpoint.sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"fedsea openai: serving `{endpoint.name}` at http://{shown}:{port}/v1 (context "
        f"{endpoint.engine.context_limit} tokens, {'API key required' if endpoint.keyed else 'no API key'}); "
        f"the trunk at {args.server} sees only hidden states",
        flush=True,
    )
    from fedsea.serving.settings import is_loopback

    if not is_loopback(str(host)):
        print(
            f"warning: {host} is reachable from other machines over plain HTTP: prompts, answers and the API key "
            "cross that network unencrypted (put a TLS proxy in front)",
            file=sys.stderr,
        )
    print("Ctrl-C stops it.", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[endpoint.sock])
    except KeyboardInterrupt:
        pass
    finally:
        endpoint.sock.close()
    return 0
