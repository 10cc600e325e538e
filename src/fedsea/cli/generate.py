"""``fedsea generate`` and ``fedsea chat``: text through the split, the server never sees it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

# The wire's settings (``fedsea.config.WireConfig``) as the client commands' flags.
WIRE_FLAGS: dict[str, str] = {
    "dtype": "--wire-dtype",
    "latency_ms": "--net-latency-ms",
    "mbps": "--net-mbps",
    "compression": "--wire-compression",
}
MODEL_FLAGS: dict[str, str] = {"source": "--model"}


def add_model_split_wire_args(parser: argparse.ArgumentParser, keep: str | None = None) -> None:
    """--model, --head-layers, --tail-layers and the wire's flags, from their settings classes.

    ``keep``: where the values come from when a flag is not given (``fedsea join``: the run file).
    """
    from fedsea.cli.flags import add_settings_flags
    from fedsea.config import SplitConfig, WireConfig

    add_model_flags(parser, keep=keep)
    add_settings_flags(parser, SplitConfig(), keep=keep)
    add_settings_flags(parser, WireConfig(), flags=WIRE_FLAGS, choices=wire_choices(), keep=keep)


def wire_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of the wire's flags that take a name (argparse's check and help)."""
    from fedsea.config import WIRE_COMPRESSIONS, WIRE_DTYPE_SETTINGS

    return {"dtype": WIRE_DTYPE_SETTINGS, "compression": WIRE_COMPRESSIONS}


def add_model_flags(parser: argparse.ArgumentParser, keep: str | None = None) -> None:
    """--model, --device and --dtype, from ``ModelSettings``."""
    from fedsea.cli.flags import add_settings_flags
    from fedsea.config import DTYPE_SPECS
    from fedsea.federation.simconfig import ModelSettings

    add_settings_flags(parser, ModelSettings(), flags=MODEL_FLAGS, choices={"dtype": DTYPE_SPECS}, keep=keep)


def model_settings(args: argparse.Namespace, base: Any = None) -> Any:
    """The ``ModelSettings`` of the flags given over ``base`` (default: the defaults)."""
    from fedsea.cli.flags import settings_from_flags
    from fedsea.federation.simconfig import ModelSettings

    return settings_from_flags(args, base if base is not None else ModelSettings(), flags=MODEL_FLAGS)


def load_placed(settings: Any, spread: bool = False) -> Any:
    """``load_model`` of a ``ModelSettings``: its source, on its device, in its dtype."""
    from fedsea.model.load import load_model

    return load_model(settings.source, dtype=settings.dtype, device=settings.device, spread=spread)


def add_connection_args(parser: argparse.ArgumentParser, keep: str | None = None) -> None:
    """Server address, model, partition points, wire, TLS and token: shared by the client commands."""
    parser.add_argument("--server", required=True, help="host:port of fedsea serve")
    add_model_split_wire_args(parser, keep)
    parser.add_argument("--tls-ca", help="CA that signed the server's certificate")
    parser.add_argument("--tls-cert", help="client certificate, for mutual TLS")
    parser.add_argument("--tls-key", help="client key, for mutual TLS")
    parser.add_argument("--token", help="bearer token (default: $FEDSEA_TOKEN)")
    add_timeout_args(parser)


def add_timeout_args(parser: argparse.ArgumentParser) -> None:
    """--call-timeout-s, --step-timeout-s, ...: the deadlines of ``ClientTimeouts`` (None when not given)."""
    from fedsea.cli.flags import add_settings_flags
    from fedsea.client.deadlines import ClientTimeouts

    group = parser.add_argument_group("deadlines (a server that does not answer in time is an error, exit 2)")
    add_settings_flags(group, ClientTimeouts(), keep="{default}")


def client_timeouts(args: argparse.Namespace, round_wait_s: float | None = None) -> Any:
    """The ``ClientTimeouts`` of the flags given over the defaults.

    ``round_wait_s``: the longest a run may keep a client waiting for a round (``fedsea join``,
    from the run file): the round deadline is raised to it unless ``--round-timeout-s`` is given.
    """
    import dataclasses

    from fedsea.cli.flags import settings_from_flags
    from fedsea.client.deadlines import ClientTimeouts

    base = ClientTimeouts()
    if round_wait_s is not None and args.round_timeout_s is None:
        base = dataclasses.replace(base, round_timeout_s=max(base.round_timeout_s, round_wait_s))
    return settings_from_flags(args, base)


def add_noise_args(parser: argparse.ArgumentParser) -> None:
    """The noise on h_p: one of --sigma, --relative-sigma (the default level), --epsilon."""
    from fedsea.config import RECOMMENDED_RELATIVE_SIGMA
    from fedsea.privacy.constants import DEFAULT_DELTA

    level = parser.add_mutually_exclusive_group()
    level.add_argument("--sigma", type=float, default=None, help="std of the Gaussian noise on h_p (0: none)")
    level.add_argument(
        "--relative-sigma",
        type=float,
        default=None,
        help=f"sigma as a multiple of h_p's RMS on public text (default: {RECOMMENDED_RELATIVE_SIGMA}, PRIVACY.md)",
    )
    level.add_argument("--epsilon", type=float, default=None, help="target epsilon (needs --clip-norm)")
    parser.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="delta of epsilon (default: %(default)s)")
    parser.add_argument("--clip-norm", type=float, default=None, help="per-token L2 clip before the noise")
    parser.add_argument("--noise-seed", type=int, default=None, help="noise seed (default: the OS's; keep it secret)")


def noise_target(args: argparse.Namespace, releases: int) -> Any:
    """The noise flags as a ``NoiseTarget``: the level given, else the recommended relative one.

    The noise seed is the OS's unless --noise-seed: a server that knew it could subtract the noise.
    """
    from fedsea.config import RECOMMENDED_RELATIVE_SIGMA
    from fedsea.privacy.calibration import NoiseTarget

    given = {"sigma": args.sigma, "relative_sigma": args.relative_sigma, "epsilon": args.epsilon}
    level = {k: v for k, v in given.items() if v is not None} or {"relative_sigma": RECOMMENDED_RELATIVE_SIGMA}
    return NoiseTarget(**level, delta=args.delta, clip_norm=args.clip_norm, releases=releases, seed=args.noise_seed)


def client_tls(args: argparse.Namespace) -> Any:
    """The client's TLS settings from ``--tls-ca/--tls-cert/--tls-key`` (None: plaintext)."""
    from fedsea.client.connection import ClientTls

    if not (args.tls_ca or args.tls_cert):
        return None
    from fedsea.wire.certs import check_tls_files

    # A bad PEM would surface as an UNAVAILABLE that blames the network: name the file instead.
    check_tls_files(args.tls_cert, args.tls_key, args.tls_ca)
    return ClientTls(
        Path(args.tls_ca) if args.tls_ca else None,
        Path(args.tls_cert) if args.tls_cert else None,
        Path(args.tls_key) if args.tls_key else None,
    )


def _generation_args(parser: argparse.ArgumentParser) -> None:
    from fedsea.training.generation_config import GenerationConfig

    g = GenerationConfig()
    parser.add_argument(
        "--adapters",
        help="folder with head/, trunk/ and tail/ adapters (fedsea train --save-adapters), or a federated run's "
        "folder (its latest round) or round checkpoint (RUN/checkpoints/round-NNNN); with a run, "
        "--head-layers/--tail-layers default to the run's",
    )
    parser.add_argument(
        "--base-trunk",
        action="store_true",
        help="with --adapters: the folder may lack trunk/ and the server's trunk runs without an adapter",
    )
    parser.add_argument("--max-new-tokens", type=int, default=g.max_new_tokens)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=g.temperature)
    parser.add_argument("--top-k", type=int, default=g.top_k)
    parser.add_argument("--top-p", type=float, default=g.top_p)
    parser.add_argument("--repetition-penalty", type=float, default=g.repetition_penalty)
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--no-chat-template", action="store_true", help="send the prompt as raw text")
    parser.add_argument("--no-cache", action="store_true", help="naive baseline: recompute everything each token")
    parser.add_argument(
        "--speculative",
        metavar="DRAFTER",
        help="speculative decoding, several tokens per round trip to the server (one prompt at a time): "
        "'prompt-lookup' (copies from the prompt and the answer so far), 'bridge:FILE' (this client's head and "
        "tail with a trained bridge for the trunk: `fedsea bridge train`) or a small draft model sharing the "
        "tokenizer (a --model source)",
    )
    parser.add_argument(
        "--draft-tokens",
        type=int,
        default=None,
        help="with --speculative: at most this many draft tokens per round trip (default: 10 for prompt-lookup, "
        "6 for a model or bridge)",
    )


def _client(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from fedsea.client.split_client import SplitClient
    from fedsea.config import SplitConfig
    from fedsea.model.load import load_tokenizer
    from fedsea.model.split import split_model
    from fedsea.privacy.calibration import resolve_noise
    from fedsea.wire.shaper import NetShaper

    run = None
    if args.adapters:
        from fedsea.federation.run_adapters import run_cut, run_source

        run = run_source(args.adapters)  # a run folder or a round checkpoint: the global adapter
    model = load_placed(model_settings(args))
    # (p, q): the flags, else the run's cut or the one saved adapters record, else SplitConfig's
    # defaults (the flags default to None here).
    cut: tuple[int | None, int | None] = (None, None)
    if run is not None:
        cut = run_cut(args.adapters)
    elif args.adapters:
        from fedsea.cli.eval import saved_partition

        cut = saved_partition(args.adapters, int(model.config.num_hidden_layers))
    if args.head_layers is None:
        args.head_layers = cut[0] if cut[0] is not None else SplitConfig.head_layers
    if args.tail_layers is None:
        args.tail_layers = cut[1] if cut[1] is not None else SplitConfig.tail_layers
    split = split_model(model, args.head_layers, args.tail_layers)
    tokenizer = load_tokenizer(args.model)
    # Measured before the adapters load: the level is relative to the public head's scale.
    # Each prompt token and each new token is sent once per generation (one release); a chat
    # sends the whole conversation again every turn, so its releases grow with the turns.
    noise = resolve_noise(noise_target(args, 1), split.head, tokenizer)
    print(f"noise on h_p (p={args.head_layers}): {noise.summary()}", file=sys.stderr)
    if run is not None:
        from fedsea.federation.run_adapters import load_run_adapters

        round_number = load_run_adapters(split, args.adapters)  # head, trunk and tail blocks of the global adapter
        print(f"adapters: round {round_number} of the run in {run[0]}, at (p, q) = {cut}", file=sys.stderr)
    elif args.adapters:
        check_adapter_parts(args.adapters, args.base_trunk)
        split.load_adapters(args.adapters)  # the trunk adapter goes to the server on connect
    client = SplitClient(
        args.server,
        split,
        noise=noise.noise,
        wire_dtype=args.wire_dtype,
        wire_compression=args.wire_compression,
        tls=client_tls(args),
        token=args.token or os.environ.get("FEDSEA_TOKEN"),
        shaper=NetShaper(args.net_latency_ms, args.net_mbps or 0.0),  # unset mbps: unlimited (0)
        tokenizer=tokenizer,
        timeouts=client_timeouts(args),
    )
    options = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": tuple(args.stop),
        "use_cache": not args.no_cache,
        "speculative": args.speculative,
        "num_draft_tokens": args.draft_tokens,
    }
    return client, options


def check_adapter_parts(directory: str, base_trunk: bool) -> None:
    """Refuse an ``--adapters`` folder that lacks a part: the split would quietly run that part's
    base weights (the server keeps its base trunk when no trunk adapter is sent). A missing
    ``trunk/`` is allowed with ``--base-trunk`` (adapters trained on head and tail only)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"--adapters {directory}: no such folder")
    missing = [p for p in ("head", "trunk", "tail") if not (folder / p).is_dir()]
    if base_trunk and "trunk" in missing:
        missing.remove("trunk")
    if missing:
        hint = " (or --base-trunk to run the trunk without an adapter)" if missing == ["trunk"] else ""
        raise ValueError(f"--adapters {directory} has no {'/, '.join(missing)}/ adapter folder{hint}")


def _cmd_generate(args: argparse.Namespace) -> int:
    client, options = _client(args)
    chat = False if args.no_chat_template else None
    with client:
        if args.stream:
            if len(args.prompt) != 1:
                raise ValueError("--stream takes exactly one --prompt")
            for piece in client.stream(args.prompt[0], chat=chat, **options):
                print(piece, end="", flush=True)
            print()
        else:
            for prompt, answer in zip(args.prompt, client.generate(args.prompt, chat=chat, **options), strict=True):
                if len(args.prompt) > 1:
                    print(f"> {prompt}")
                print(answer)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    client, options = _client(args)
    history: list[dict[str, str]] = []
    print("fedsea chat: your text stays on this machine; the server sees only hidden states, noised as above.")
    print(CHAT_HELP)
    with client:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return 0
            if not line:
                continue
            # Chat commands are handled here, never sent to the model; "//text" sends "/text".
            if line.startswith("/") and not line.startswith("//"):
                if line in ("/quit", "/exit"):
                    return 0
                if line == "/reset":
                    history.clear()
                    print("(conversation reset)")
                elif line == "/help":
                    print(CHAT_HELP)
                else:
                    print(f"(unknown command {line.split()[0]}; /help lists the commands)")
                continue
            history.append({"role": "user", "content": line.removeprefix("/")})
            print("model> ", end="", flush=True)
            pieces = []
            stream = client.stream(history, **options)
            for piece in stream:
                pieces.append(piece)
                print(piece, end="", flush=True)
            print()
            if stream.finish_reason == "length":
                print(f"(answer cut at --max-new-tokens {options['max_new_tokens']}; raise it for longer answers)")
            history.append({"role": "assistant", "content": "".join(pieces).strip()})


CHAT_HELP = "/help lists these, /reset forgets the conversation, /quit (or Ctrl-D) ends it; //text sends /text."


def add_generate_commands(sub: Any) -> None:
    """Register ``generate`` and ``chat`` on the ``fedsea`` subparsers."""
    generate = sub.add_parser("generate", help="generate text through the split (prompts never leave this machine)")
    add_connection_args(generate)
    generate.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable: one batch)")
    generate.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    _generation_args(generate)
    add_noise_args(generate)
    # None: not given (then the run's cut with a run's --adapters, else SplitConfig's, see _client)
    generate.set_defaults(func=_cmd_generate, head_layers=None, tail_layers=None)
    _cut_from_adapters(generate)

    chat = sub.add_parser("chat", help="an interactive chat through the split, streaming the answers")
    add_connection_args(chat)
    _generation_args(chat)
    add_noise_args(chat)
    chat.set_defaults(func=_cmd_chat, head_layers=None, tail_layers=None)
    _cut_from_adapters(chat)


def _cut_from_adapters(parser: argparse.ArgumentParser) -> None:
    """Say in --head-layers/--tail-layers' help where their value comes from when not given (``_client``)."""
    from fedsea.config import SplitConfig

    for action in parser._actions:
        if action.dest in ("head_layers", "tail_layers") and action.help:
            default = getattr(SplitConfig, action.dest)
            base = action.help.split(" (default:")[0]
            action.help = f"{base} (default: the cut --adapters records, a run's or saved adapters'; else {default})"


__all__ = [
    "MODEL_FLAGS",
    "WIRE_FLAGS",
    "add_connection_args",
    "add_generate_commands",
    "add_model_flags",
    "add_model_split_wire_args",
    "add_noise_args",
    "add_timeout_args",
    "client_timeouts",
    "client_tls",
    "load_placed",
    "model_settings",
    "noise_target",
    "wire_choices",
]
