"""``fedsea serve``, ``fedsea train``, ``fedsea certs`` and ``fedsea token``: the networked commands."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from fedsea.cli.flags import add_settings_flags, settings_from_flags
from fedsea.cli.generate import (
    add_connection_args,
    add_model_flags,
    add_noise_args,
    client_timeouts,
    client_tls,
    load_placed,
    model_settings,
    noise_target,
)
from fedsea.config import LoraSpec, OptimConfig, ServerLimits
from fedsea.federation.simconfig import ModelSettings, PrivacySettings, RunConfig
from fedsea.privacy.constants import HEAD_REGULARIZERS

# LoraSpec's fields as fedsea train's flags.
LORA_FLAGS: dict[str, str] = {
    "r": "--lora-r",
    "alpha": "--lora-alpha",
    "dropout": "--lora-dropout",
    "target_modules": "--targets",
}


def serve_settings(args: argparse.Namespace) -> tuple[RunConfig, ServerLimits, ModelSettings]:
    """The run (``--run``, else the defaults), the limits and the model of ``fedsea serve``: a run
    file's ``[limits]``, ``[model]`` and ``[server]`` (device, dtype) are the defaults, and the
    flags given win over them."""
    from fedsea.federation.simconfig import load_config

    run = load_config(args.run) if args.run else RunConfig()
    limits = settings_from_flags(args, run.limits)
    return run, limits, model_settings(args, run.server_model())


def _cmd_serve(args: argparse.Namespace) -> int:
    from fedsea.model.device import describe_placement
    from fedsea.server.app import ServerTls, TrunkServer, serve_until_signalled
    from fedsea.server.trunk import TrunkHost
    from fedsea.wire.auth import TokenStore

    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("fedsea serve: give both --tls-cert and --tls-key")
    if args.tls_client_ca and not args.tls_cert:
        raise SystemExit("fedsea serve: --tls-client-ca needs --tls-cert and --tls-key")
    run, limits, model = serve_settings(args)
    # A server's operator watches its clients come and go (sessions opened and closed, idle ones
    # reaped, a native run's rounds): INFO from the server and federation layers, time-stamped.
    for name in ("fedsea.server", "fedsea.federation"):
        logging.getLogger(name).setLevel(min(logging.INFO, logging.getLogger().level))
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    if args.run:
        from fedsea.cli.fed import native_note

        native_note("fedsea serve --run", run.federation.mode)
    tls = None
    if args.tls_cert:
        from fedsea.wire.certs import check_tls_files

        # A bad PEM would surface as gRPC's "Failed to bind": name the file instead.
        flags = ("--tls-cert", "--tls-key", "--tls-client-ca")
        check_tls_files(args.tls_cert, args.tls_key, args.tls_client_ca, flags=flags)
        client_ca = Path(args.tls_client_ca) if args.tls_client_ca else None
        tls = ServerTls(Path(args.tls_cert), Path(args.tls_key), client_ca)
    tokens = TokenStore.load(args.tokens) if args.tokens else None
    # Refuse a plaintext public bind before spending time on the model.
    server_args = {
        "host": args.host,
        "port": args.port,
        "tls": tls,
        "insecure": args.insecure,
        "allow_anonymous": args.allow_anonymous,
    }
    TrunkServer.check_bind(args.host, tls, args.insecure)
    TrunkServer.check_identity(args.host, tls, tokens, args.allow_anonymous)
    if args.run and args.resume:
        from fedsea.federation.runstate import completed_round

        # A broken checkpoint is refused now (CheckpointError naming the file), not after the model loads.
        completed_round(Path(args.run_dir or Path(args.run).parent))
    print(f"loading {model.source} (device {model.device}, dtype {model.dtype}) ...", flush=True)
    host = TrunkHost(load_placed(model, spread=True), limits)
    print(f"trunk on {describe_placement(host.model)}; base model fingerprint {host.fingerprint}", flush=True)
    rounds = None
    if args.run:
        from fedsea.federation.coordinator import coordinator_factory
        from fedsea.federation.simconfig import RunPlan

        federation = RunPlan(run).fed
        run_dir = Path(args.run_dir or Path(args.run).parent)
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"federated run: {federation.rounds} rounds, {federation.mode}, checkpoints in {run_dir}", flush=True)
        rounds = coordinator_factory(federation, run_dir, args.resume)
    server = TrunkServer(host, tokens=tokens, rounds=rounds, **server_args)
    asyncio.run(serve_until_signalled(server))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fedsea.cli.flags import require_positive
    from fedsea.client.split_client import SplitClient
    from fedsea.model.load import load_tokenizer
    from fedsea.model.split import split_model
    from fedsea.privacy.calibration import resolve_noise
    from fedsea.privacy.regularizers import make_head_regularizer
    from fedsea.training.data import iterate_batches, load_jsonl
    from fedsea.wire.shaper import NetShaper

    require_positive(args, "batch_size", "micro_batches", "epochs", "max_length")
    tokenizer = load_tokenizer(args.model)
    examples = load_jsonl(args.data, tokenizer, args.max_length)
    # fedsea train starts from the library's LoraSpec and OptimConfig (not a run file's defaults).
    lora = settings_from_flags(args, LoraSpec(), flags=LORA_FLAGS)
    model = load_placed(model_settings(args))
    split = split_model(model, args.head_layers, args.tail_layers).add_lora(lora)
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    total = min(args.max_steps or steps_per_epoch * args.epochs, steps_per_epoch * args.epochs)
    # Each example's h_p is sent once per epoch begun (the accountant composes over these).
    releases = math.ceil(total * args.batch_size / max(1, len(examples)))
    noise = resolve_noise(noise_target(args, releases), split.head, tokenizer)
    if not args.json:
        print(f"noise on h_p (p={args.head_layers}): {noise.summary()}")
    tls = client_tls(args)
    client = SplitClient(
        args.server,
        split,
        noise=noise.noise,
        head_regularizer=make_head_regularizer(
            args.head_regularizer, args.regularizer_weight, split.head.embed_tokens.weight.detach(), noise.noise
        ),
        optim=settings_from_flags(args, OptimConfig(), ["lr"]),
        wire_dtype=args.wire_dtype,
        wire_compression=args.wire_compression,
        tls=tls,
        token=args.token or os.environ.get("FEDSEA_TOKEN"),
        shaper=NetShaper(args.net_latency_ms, args.net_mbps or 0.0),  # unset mbps: unlimited (0)
        seed=args.seed,
        micro_batches=args.micro_batches,
        timeouts=client_timeouts(args),
    )
    losses: list[float] = []
    start = time.perf_counter()
    with client:
        batches = iterate_batches(examples, args.batch_size, tokenizer.pad_token_id, args.epochs, args.seed)
        # Closed on an error too, so that the one-line error is not followed by the bar again.
        with tqdm(total=total, desc="training", unit="step", disable=args.quiet) as bar:
            for step, batch in enumerate(batches):
                if step >= total:
                    break
                losses.append(client.train_step(batch).loss)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.update()
        stats = client.stats()
        if args.save_adapters:
            client.save_adapters(args.save_adapters)
    elapsed = time.perf_counter() - start
    window = max(1, len(losses) // 10)
    summary: dict[str, Any] = {
        "steps": len(losses),
        "examples": len(examples),
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "seconds": elapsed,
        "bytes_sent": stats["bytes_sent"],
        "bytes_received": stats["bytes_received"],
        "network_s": stats["network_s"],
        "server_compute_s": stats["remote_compute_s"],
        "client_compute_s": stats["local_compute_s"],
        "rpcs": stats["rpcs"],
        "adapters": args.save_adapters,
        "noise": noise.to_dict(),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        mib = 1024 * 1024
        print(f"\n{len(losses)} steps on {len(examples)} examples in {elapsed:.1f} s")
        print(f"loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f} (mean of the first and last {window})")
        print(f"sent {summary['bytes_sent'] / mib:.2f} MiB, received {summary['bytes_received'] / mib:.2f} MiB")
        print(
            f"time: network {summary['network_s']:.2f} s, server compute {summary['server_compute_s']:.2f} s, "
            f"client compute {summary['client_compute_s']:.2f} s"
        )
        print(f"{'rpc':<14}{'calls':>7}{'sent':>14}{'received':>14}")
        for name, c in stats["rpcs"].items():
            print(f"{name:<14}{c['calls']:>7}{c['bytes_sent']:>14,}{c['bytes_received']:>14,}")
        if args.save_adapters:
            print(f"adapters saved to {args.save_adapters}")
    return 0


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedsea.wire.certs import add_client_certs, make_test_certs

    names = client_names(args.clients)
    paths = make_test_certs(args.dir, hosts=args.host, client_name=args.client_name, days=args.days)
    clients = add_client_certs(args.dir, names, args.days) if names else []
    print(f"wrote a throwaway CA and server/client certificates to {Path(args.dir)} (for tests, not production):")
    for field in dataclasses.fields(paths):
        print(f"  {field.name:<12} {getattr(paths, field.name)}")
    for name, cert in zip(names, clients, strict=True):
        print(f"  {name:<12} {cert} (key {cert.with_suffix('.key')})")
    return 0


def client_names(given: list[str]) -> list[str]:
    """``--clients``: one number N (the run file's names client-0 ... client-{N-1}) or the names themselves."""
    if len(given) == 1 and given[0].isdigit():
        count = int(given[0])
        if not 1 <= count <= 1000:
            raise ValueError(f"--clients {count}: give between 1 and 1000 clients (or their names)")
        return [f"client-{i}" for i in range(count)]
    if len(set(given)) != len(given):
        raise ValueError(f"--clients names a client twice: {' '.join(given)}")
    return list(given)


def _cmd_token(args: argparse.Namespace) -> int:
    from fedsea.wire.auth import TokenStore

    store = TokenStore.load(args.file) if Path(args.file).exists() else TokenStore()
    if args.client_id in store and not args.replace:
        raise ValueError(
            f"{args.file} already has a token for {args.client_id!r}; add --replace to make a new one "
            "(the old token then stops working)"
        )
    role = "operator" if args.operator else "client"
    token = store.add(args.client_id, role)
    store.save(args.file)
    print(token)
    print(
        f"({role} token for {args.client_id!r}; only its hash is stored in {args.file}: keep it now)", file=sys.stderr
    )
    return 0


def add_wire_commands(sub: Any) -> None:
    """Register the networked subcommands on the ``fedsea`` parser."""
    serve = sub.add_parser("serve", help="run the trunk server")
    add_model_flags(serve, keep="the run file's ([server], else [model]) with --run, else {default}")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--tls-cert", help="server certificate (PEM)")
    serve.add_argument("--tls-key", help="server key (PEM)")
    serve.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS)")
    serve.add_argument("--tokens", help="tokens file (fedsea token add); clients must present one")
    serve.add_argument("--insecure", action="store_true", help="allow plaintext on a non-loopback address")
    serve.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="serve a non-loopback address with neither --tokens nor --tls-client-ca (every caller one identity)",
    )
    serve.add_argument(
        "--run",
        help="run file (TOML): coordinate a native federated run (fedsea join; deprecated: runs go on Flower, "
        "flwr run)",
    )
    serve.add_argument("--run-dir", help="where the run's checkpoints and metrics go")
    serve.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    add_settings_flags(serve, ServerLimits(), keep="the run file's [limits] with --run, else {default}")
    serve.set_defaults(func=_cmd_serve)

    train = sub.add_parser("train", help="fine-tune one client through a trunk server on a JSONL file")
    add_connection_args(train)
    train.add_argument("--data", required=True, help='JSONL of {"text": ...} or {"prompt": ..., "completion": ...}')
    add_settings_flags(train, LoraSpec(), flags=LORA_FLAGS)
    add_settings_flags(train, OptimConfig(), ["lr"])
    train.add_argument("--batch-size", type=int, default=4)
    train.add_argument(
        "--micro-batches", type=int, default=1, help="pipeline each step as this many micro-batches (1: off)"
    )
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    train.add_argument("--max-length", type=int, default=256, help="tokens per example, at most")
    add_noise_args(train)
    add_settings_flags(train, PrivacySettings(), choices={"head_regularizer": HEAD_REGULARIZERS})
    train.add_argument("--seed", type=int, default=0, help="seed of the data order and the LoRA init")
    train.add_argument("--save-adapters", help="write head/trunk/tail adapters here at the end")
    train.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    certs = sub.add_parser("certs", help="make a throwaway CA, server and client certificate (test setups)")
    certs.add_argument("dir")
    certs.add_argument("--host", action="append", default=[], help="extra server host name or IP (repeatable)")
    certs.add_argument("--client-name", default="fedsea-client", help="the client certificate's common name")
    certs.add_argument("--days", type=int, default=30)
    certs.add_argument(
        "--clients",
        nargs="+",
        default=[],
        metavar="N|NAME",
        help="also one client certificate per client: a number N (client-0 ... client-{N-1}, a run file's "
        "names) or the names; written to DIR/clients/<name>.pem and .key",
    )
    certs.set_defaults(func=_cmd_certs)

    token = sub.add_parser("token", help="manage client tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    add = token_sub.add_parser("add", help="make a token for a client; prints it once, stores its hash")
    add.add_argument("file", help="tokens file (created if missing)")
    add.add_argument("client_id")
    add.add_argument(
        "--operator",
        action="store_true",
        help="an operator token: server-wide GetStats; stages and collects trunk adapters (a Flower ServerApp)",
    )
    add.add_argument("--replace", action="store_true", help="replace the client's existing token (it stops working)")
    add.set_defaults(func=_cmd_token)
