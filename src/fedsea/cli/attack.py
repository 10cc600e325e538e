"""``fedsea attack``: the privacy attack grid (PRIVACY.md), its flags and their checks.

List flags take comma-separated values (``--sigma 0,1,4,16``); a bad value is an argparse
error (exit 2) before any model is loaded.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def _comma_list(item: Callable[[str], Any], what: str, choices: tuple[str, ...] = ()) -> Callable[[str], list[Any]]:
    """An argparse type: a non-empty comma-separated list, each value parsed by ``item``."""

    def parse(text: str) -> list[Any]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        values = []
        for part in parts:
            try:
                value = item(part)
            except (ValueError, argparse.ArgumentTypeError):
                raise argparse.ArgumentTypeError(f"{part!r} is not {what}") from None
            if choices and value not in choices:
                raise argparse.ArgumentTypeError(f"{part!r} is not one of {', '.join(choices)}")
            values.append(value)
        return values

    return parse


def _finite(text: str, strict: bool) -> float:
    """A finite number >= 0 (``strict``: > 0), or an argparse error naming the bound."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number {'>' if strict else '>='} 0")
    return value


def _non_negative(text: str) -> float:
    return _finite(text, strict=False)


def _positive_float(text: str) -> float:
    return _finite(text, strict=True)


def _probability(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 1)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def _cmd_attack(args: argparse.Namespace) -> int:
    from fedsea.cli.attack_run import run_attack

    return run_attack(args)


def add_attack_commands(sub: Any) -> None:
    """Register ``fedsea attack``."""
    from fedsea.cli.flags import add_settings_flags
    from fedsea.config import DTYPE_SPECS, Placement
    from fedsea.experiments.constants import ATTACKER_HEADS, ATTACKS, DEFENCES
    from fedsea.model.constants import DEFAULT_MODEL

    attack = sub.add_parser(
        "attack",
        help="every attack against every (defence, p, sigma): a table and a privacy-utility plot (PRIVACY.md)",
    )
    add = attack.add_argument
    add("--model", default=DEFAULT_MODEL, help="model source (default: %(default)s)")
    add_settings_flags(attack, Placement(), choices={"dtype": DTYPE_SPECS})
    add(
        "--sigma",
        type=_comma_list(_non_negative, "a number >= 0"),
        default=[0.0, 1.0, 4.0, 16.0],
        help="noise std per coordinate, comma-separated (default: 0,1,4,16)",
    )
    add("--relative", action="store_true", help="read --sigma as multiples of h_p's RMS on the auxiliary text")
    add(
        "--head-layers",
        type=_comma_list(_positive_int, "an integer >= 1"),
        default=[1, 2, 4],
        help="cut points p, comma-separated (default: 1,2,4)",
    )
    add("--tail-layers", type=_positive_int, default=1, help="q, blocks in the client's tail (default: 1)")
    add(
        "--defence",
        type=_comma_list(str, "a defence", DEFENCES),
        default=["none"],
        help=f"comma-separated subset of {','.join(DEFENCES)} (default: none)",
    )
    add(
        "--attacks",
        type=_comma_list(str, "an attack", ATTACKS),
        default=["probe", "decoder", "bisr"],
        help=f"comma-separated subset of {','.join(ATTACKS)} (default: probe,decoder,bisr)",
    )
    add("--clip-norm", type=_positive_float, default=None, help="per-token clip norm (gives epsilon; default: none)")
    add("--releases", type=_positive_int, default=1, help="releases per token for epsilon (default: 1)")
    add("--delta", type=_probability, default=1e-5, help="delta of epsilon (default: 1e-5)")
    add("--aux-texts", type=_positive_int, default=200, help="attacker's XSum validation documents (default: 200)")
    add("--victim-texts", type=_positive_int, default=16, help="victim texts (default: 16)")
    add(
        "--victim",
        choices=["xsum", "task"],
        default="xsum",
        help="victim text: XSum test summaries, or the prompts of --task's eval split (default: xsum)",
    )
    add("--max-tokens", type=_positive_int, default=32, help="tokens kept per text (default: 32)")
    add("--task", default="sst2", help="task of the fine-tuning utility and the victim head (default: sst2)")
    add(
        "--utility",
        choices=["finetune", "perplexity"],
        default="finetune",
        help="finetune: task quality after fine-tuning, noise at the cut; perplexity: base model under noise",
    )
    add("--finetune-steps", type=_positive_int, default=24, help="fine-tuning steps per setting (default: 24)")
    add("--finetune-batch-size", type=_positive_int, default=4, help="sequences per step (default: 4)")
    add("--finetune-lr", type=_positive_float, default=1e-3, help="fine-tuning learning rate (default: 1e-3)")
    add("--eval-limit", type=_positive_int, default=200, help="task rows evaluated per setting (default: 200)")
    add(
        "--victim-head",
        choices=["base", "finetuned", "utility"],
        default=None,
        help="the victim's head: the public base head; one with a private adapter fine-tuned on --task "
        "without noise (one per defence and p); or utility: the head each setting's utility fine-tuning "
        "trained under its noise, i.e. the deployed one (default: finetuned when nopeek/adversarial or "
        "--attacker-head victim are asked for, else base)",
    )
    add(
        "--attacker-head",
        type=_comma_list(str, "an attacker head", ATTACKER_HEADS),
        default=["base"],
        help="the head the attacker trains and optimises with, comma-separated: base (the public head) and/or "
        "victim (it knows the victim's head adapter, as a FedAvg server does; needs --victim-head finetuned) "
        "(default: base)",
    )
    add("--regularizer-weight", type=_non_negative, default=1.0, help="weight of nopeek/adversarial (default: 1)")
    add("--epochs", type=_positive_int, default=5, help="training epochs of the learned attacks (default: 5)")
    add("--probe-width", type=_positive_int, default=512, help="hidden width of the learned attacks (default: 512)")
    add("--seed", type=int, default=0, help="seed of attackers (seed), victims (seed + 1) and fine-tuning")
    add("--data-dir", default=None, help="local data folder (default: $FEDSEA_DATA, ../shared/datasets)")
    add("--out", default=None, help="output folder (default: runs/attack-<timestamp>)")
    attack.set_defaults(func=_cmd_attack)
