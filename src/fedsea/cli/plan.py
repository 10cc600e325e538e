"""``fedsea plan`` (predicted step time of every cut, and a recommended cut per client) and ``fedsea profile``.

Module import is light (argparse only): torch loads in the commands' functions, so that
``fedsea --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

MAX_LAYERS = 6  # the largest p and q shown by default: the paper's range is 1-5, the analysis's 1-6
REPEATS = 3  # timed steps per profiled cut


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run_file(path: str | None) -> str:
    if path is not None:
        return path
    from importlib.resources import files

    return str(files("fedsea.federation").joinpath("demo.toml"))


def _named(specs: list[str], what: str) -> dict[str, str]:
    """``NAME=VALUE`` (or a bare ``VALUE``, for every client: ``*``) -> {name: value}."""
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            name, value = "*", spec
        if not name or not value:
            raise ValueError(f"{what} is NAME=VALUE or VALUE (every client), got {spec!r}")
        out[name] = value
    return out


def _cmd_profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedsea.federation.plan_measure import measure_profile
    from fedsea.federation.plan_profile import save_profile
    from fedsea.federation.simconfig import load_config

    if not Path(args.out).resolve().parent.is_dir():
        raise ValueError(f"--out {args.out}: folder {Path(args.out).parent} does not exist")
    if args.server and args.role == "server":
        raise ValueError("--server measures a client's link to the trunk server: drop it with --role server")
    run = load_config(_run_file(args.run), args.set)
    plans = {plan.name: plan for plan in run.client_plans()}
    if args.client not in plans:
        raise ValueError(f"--client {args.client} is not a client of the run ({', '.join(plans)})")
    client = plans[args.client]
    batch = args.batch or client.batch_size
    tokens = args.tokens or client.max_length
    placed = run.server_model() if args.role == "server" else client.placement()
    profile = measure_profile(
        args.model or run.model.source, batch, tokens, run.lora.parts(), args.device or placed.device,
        args.dtype or placed.dtype, run.wire.dtype, args.repeats, _progress, run.wire.compression,
    )  # fmt: skip
    if args.server:
        profile = _with_link(args, run, profile)
    path = save_profile(profile, args.out)
    tokens_step = batch * tokens
    per_block = {  # one block's cost on this machine, as the trunk measured it (most blocks: least noise)
        kind: {
            "ms": round(profile.seconds[f"trunk_{kind}"].per_block * 1000, 3),
            "tokens_per_s": round(tokens_step / max(profile.seconds[f"trunk_{kind}"].per_block, 1e-12)),
        }
        for kind in ("forward", "backward")
    }
    link = {"server": profile.link_server, "latency_ms": profile.link_latency_ms, "mbps": profile.link_mbps}
    print(json.dumps({"profile": str(path), "model": profile.model, "batch": batch, "tokens": tokens,
                      "device": profile.device, "dtype": profile.dtype, "per_block": per_block,
                      **({"link": link} if args.server else {})}))  # fmt: skip
    return 0


def _with_link(args: argparse.Namespace, run: Any, profile: Any) -> Any:
    """``profile`` with this machine's link to ``--server`` measured (a fresh session at (1, 1))."""
    import dataclasses
    import os

    import torch

    from fedsea.cli.generate import client_tls
    from fedsea.client.split_client import SplitClient
    from fedsea.federation.plan_link import measure_link
    from fedsea.model.load import load_model
    from fedsea.model.split import split_model
    from fedsea.training.batch import make_batch

    _progress(f"measuring the link to {args.server} ...")
    model = load_model(profile.model, profile.dtype, profile.device)
    split = split_model(model, 1, 1).add_lora(run.lora.base())
    vocab = int(model.config.vocab_size)
    ids = torch.randint(3, vocab, (profile.batch, profile.tokens), generator=torch.Generator().manual_seed(0))
    batch = make_batch(ids.tolist(), pad_token_id=0)
    token = os.environ.get("FEDSEA_TOKEN")  # never a flag: a secret on a command line is visible to every user
    with SplitClient(args.server, split, wire_dtype=profile.wire_dtype, tls=client_tls(args), token=token) as client:
        measured = measure_link(client, batch, profile.codec_s)
    link = measured.link
    return dataclasses.replace(
        profile, link_server=args.server, link_latency_ms=round(link.latency_ms, 3), link_mbps=link.mbps
    )


def _table(result: Any) -> str:
    gib = 2**30
    lines = [f"mode {result.mode}, {result.local_steps} local steps, noise {result.level}; leakage: {result.grids}", ""]
    for name, rows in result.table.items():
        pick = next(c for c in result.chosen if c.client == name)
        lines.append(f"{name}: predicted seconds per step at each cut, the others at theirs (* recommended)")
        lines.append("     p  q    step  client    wire  server    wait  process mem  bytes/step  best attack")
        for x in rows:
            mark = "*" if x.cut == pick.cut else " "
            leak = f"{x.leakage:.3f}" if x.leakage is not None else "not measured"
            memory, sent = x.client_process_bytes / gib, x.bytes_per_step / 2**20
            lines.append(
                f"  {mark} {x.head_layers:2d} {x.tail_layers:2d} {x.step_s:7.3f} {x.client_s:7.3f} {x.wire_s:7.3f} "
                f"{x.server_s:7.3f} {x.waiting_s:7.3f}  {memory:7.2f} GiB {sent:7.2f} MiB  {leak}"
            )
        lines.append("")
    picks = ", ".join(f"{c.client} (p, q) = ({c.head_layers}, {c.tail_layers})" for c in result.chosen)
    lines.append(f"recommended: {picks}; a round {result.round_s:.3g} s")
    return "\n".join(lines)


def _cmd_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedsea.federation.plan_leakage import default_grids
    from fedsea.federation.plan_profile import load_profile
    from fedsea.federation.plan_run import check_write_target, plan_run, write_cuts
    from fedsea.federation.planner import Constraints, Link
    from fedsea.federation.simconfig import load_config

    if args.write:
        check_write_target(args.write)
    if args.max_leakage is not None and not 0 <= args.max_leakage <= 1:
        raise ValueError(f"--max-leakage is a share of tokens in [0, 1], got {args.max_leakage}")
    if args.max_client_memory_gib is not None and not (0 < args.max_client_memory_gib < 2**40):
        raise ValueError(f"--max-client-memory-gib must be a positive number, got {args.max_client_memory_gib}")
    run_file = _run_file(args.run)
    run = load_config(run_file, args.set)
    clients = {name: load_profile(path) for name, path in _named(args.client_profile, "--client-profile").items()}
    if args.profile:
        clients.setdefault("*", load_profile(args.profile))
    servers = [load_profile(p) for p in args.server_profile] or ([load_profile(args.profile)] if args.profile else [])
    links = {name: Link.parse(text) for name, text in _named(args.link, "--link").items()}
    grids = [Path(g) for g in args.grid] if args.grid is not None else default_grids(run.model.source)
    memory = int(args.max_client_memory_gib * 2**30) if args.max_client_memory_gib is not None else None
    result = plan_run(
        run, clients, servers, links, grids, Constraints(args.max_leakage, memory),
        args.max_layers if args.max_layers > 0 else None, args.repeats, None if args.json else _progress,
    )  # fmt: skip
    written = str(write_cuts(run_file, result.chosen, args.write, args.set)) if args.write else None
    if args.json:
        print(json.dumps({"plan": result.to_dict(), "run": run_file, "written": written}))
    else:
        print(_table(result))
    if written:
        print(f"wrote the run file with the recommended cuts to {written}", file=sys.stderr)
    return 0


def add_plan_commands(sub: Any) -> None:
    """Register ``plan`` and ``profile`` on the ``fedsea`` subparsers."""
    plan = sub.add_parser(
        "plan",
        help="predict each client's step time at every cut (p, q) and recommend one per client",
        description="For each client of the run: predicted step time at every cut and where it goes (client "
        "compute, wire, server compute, waiting), client memory, bytes per step and the best attack's token "
        "recovery at the run's noise level (from the attack grids). Compute comes from profiles (`fedsea "
        "profile` on each machine, or measured here), the network from --link or the run's [wire].",
    )
    plan.add_argument("--run", default=None, help="run file (default: make demo's)")
    plan.add_argument("set", nargs="*", help="overrides of the run file: section.key=value")
    plan.add_argument("--profile", default=None, help="one profile for the server and every client")
    plan.add_argument(
        "--server-profile", action="append", default=[], help="the server's profile (one per batch shape)"
    )
    plan.add_argument("--client-profile", action="append", default=[], help="NAME=FILE, a client's profile")
    plan.add_argument(
        "--link", action="append", default=[],
        help="NAME=LATENCY_MS[:MBPS] (or LATENCY_MS[:MBPS] for every client): one-way latency and bandwidth "
        "(default: the run's [wire] latency_ms and mbps)",
    )  # fmt: skip
    plan.add_argument(
        "--max-leakage", type=float, default=None,
        help="the fastest cut whose best attack recovers at most this share of tokens (unmeasured cuts excluded)",
    )  # fmt: skip
    plan.add_argument(
        "--max-client-memory-gib", type=float, default=None,
        help="the fastest cut within this client process memory (the whole base model, the adapters and "
        "their optimizer, and the step's saved activations)",
    )  # fmt: skip
    plan.add_argument("--max-layers", type=int, default=MAX_LAYERS, help="largest p and q considered (0: all)")
    plan.add_argument(
        "--grid", action="append", default=None, help="an attack_grid.json of `fedsea attack` (repeat for several; "
        "default: the published grids of the run's model)",
    )  # fmt: skip
    plan.add_argument("--repeats", type=int, default=REPEATS, help="timed steps per profiled cut, when measuring")
    plan.add_argument("--write", default=None, help="write the run file with the recommended cuts to this path")
    plan.add_argument("--json", action="store_true", help="one JSON line instead of the table")
    plan.set_defaults(func=_cmd_plan)

    profile = sub.add_parser(
        "profile",
        help="measure this machine's compute per block for `fedsea plan` (run it on the server and on each client)",
    )
    profile.add_argument("--run", default=None, help="run file: model, batch, length, LoRA (default: make demo's)")
    profile.add_argument("set", nargs="*", help="overrides of the run file: section.key=value")
    profile.add_argument("--client", default="client-0", help="whose batch, length and placement (--role client)")
    profile.add_argument("--role", choices=("client", "server"), default="client", help="whose device and dtype")
    profile.add_argument("--out", required=True, help="the profile file to write (JSON)")
    profile.add_argument("--model", default=None, help="model source (default: the run's)")
    profile.add_argument("--batch", type=int, default=None, help="sequences per step (default: the run's)")
    profile.add_argument("--tokens", type=int, default=None, help="tokens per sequence (default: the run's)")
    profile.add_argument("--device", default=None, help="device (default: the run's for the role)")
    profile.add_argument("--dtype", default=None, help="dtype (default: the run's for the role)")
    profile.add_argument("--repeats", type=int, default=REPEATS, help="timed steps per profiled cut")
    profile.add_argument(
        "--server", default=None,
        help="also measure this client's latency and bandwidth to a running `fedsea serve` at host:port "
        "(token from $FEDSEA_TOKEN only: a secret on a command line is visible to every user); `fedsea plan` "
        "then uses them for this client, adding the run's emulated [wire] latency",
    )  # fmt: skip
    profile.add_argument("--tls-ca", help="with --server: CA that signed the server's certificate")
    profile.add_argument("--tls-cert", help="with --server: client certificate, for mutual TLS")
    profile.add_argument("--tls-key", help="with --server: client key, for mutual TLS")
    profile.set_defaults(func=_cmd_profile)
