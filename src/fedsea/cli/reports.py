"""``fedsea baseline`` (the centralized task table) and ``fedsea attack-report`` (merged attack grids)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def _cmd_baseline(args: argparse.Namespace) -> int:
    from fedsea.experiments.task_baseline import BASELINE_ROWS, markdown_table, run_task

    results = []
    t0 = time.perf_counter()
    for name in args.tasks.split(","):
        rows = args.rows or BASELINE_ROWS.get(name, 100)
        row = run_task(name, rows, args.model, progress=not args.no_progress)
        results.append(row)
        if args.json:
            print(json.dumps({"bench": "baseline", "model": args.model, **row.__dict__}), flush=True)
        else:
            metric = row.primary_metric
            change = f"{row.zero_shot[metric]:.3f} -> {row.finetuned[metric]:.3f}"
            print(f"{row.task}: {metric} {change} ({row.seconds:.0f} s)", flush=True)
    print(markdown_table(results))
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


def _cmd_attack_report(args: argparse.Namespace) -> int:
    from fedsea.experiments.privacy_report import GridRow, load_rows, write_report

    rows: list[GridRow] = []
    for spec in args.grids:
        path, _, label = spec.partition("=")
        rows += load_rows(Path(path), label or None)
    if args.by_p:
        from fedsea.experiments.partition_report import write_partition_report

        found = write_partition_report(rows, Path(args.out), args.levels, args.defence, args.chance)
        print(f"{len(rows)} rows -> {found['md']}, {found['png']}")
        return 0
    paths = write_report(rows, Path(args.out))
    print(f"{len(rows)} rows -> {paths['md']}, {paths['png']}")
    return 0


def _levels(text: str) -> list[float]:
    """An argparse type: comma-separated finite numbers >= 0."""
    from fedsea.cli.attack import _comma_list, _non_negative

    return list(_comma_list(_non_negative, "a number >= 0")(text))


def add_report_commands(sub: Any) -> None:
    """Register ``baseline`` and ``attack-report`` on the ``fedsea`` subparsers."""
    from fedsea.experiments.constants import BASELINE_ROWS
    from fedsea.model.constants import DEFAULT_MODEL

    base = sub.add_parser(
        "baseline",
        help="the centralized baseline table: each task zero-shot, then after centralized LoRA fine-tuning",
    )
    base.add_argument("--model", default=DEFAULT_MODEL)
    base.add_argument("--tasks", default=",".join(BASELINE_ROWS), help="comma-separated (default: %(default)s)")
    base.add_argument("--rows", type=int, default=None, help="rows per task (default: the table's)")
    base.add_argument("--json", action="store_true", help="one JSON line per task on stdout")
    base.add_argument("--no-progress", action="store_true")
    base.set_defaults(func=_cmd_baseline)

    report = sub.add_parser(
        "attack-report",
        help="merge several `fedsea attack` runs (attack_grid.json files) into one table and one picture",
    )
    report.add_argument("grids", nargs="+", help="attack_grid.json files, each optionally =LABEL")
    report.add_argument("--out", required=True, help="folder for the merged attack_grid.{csv,md,json} and plot")
    report.add_argument(
        "--by-p",
        action="store_true",
        help="the partition-point analysis instead: quality vs sigma and vs sigma/RMS per p, best attack vs p "
        "(partition.md, partition.png; ADAPTIVE.md)",
    )
    report.add_argument(
        "--levels",
        type=_levels,
        default=[0.14],
        help="with --by-p: sigma/RMS levels of the best-attack-vs-p table, comma-separated (default: 0.14)",
    )
    report.add_argument("--defence", default="none", help="with --by-p: the defence reported (default: none)")
    report.add_argument("--chance", type=float, default=None, help="with --by-p: a dashed line at this quality")
    report.set_defaults(func=_cmd_attack_report)
