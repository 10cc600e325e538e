"""Tables and the privacy-utility picture of an attack grid.

The picture puts, for each setting (defence, p, sigma), the *best* attack's token accuracy
(the privacy an owner actually gets) against the setting's utility, one curve per defence
and cut point, ordered by sigma.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class GridRow:
    """One attack against one setting."""

    defence: str
    head_layers: int
    sigma: float
    relative_sigma: float
    clip_norm: float | None
    epsilon: float | None
    attack: str
    token_accuracy: float
    rouge_l: float
    exact: float
    utility: float
    utility_name: str
    seconds: float
    attacker_head: str = "base"

    def to_dict(self) -> dict[str, object]:
        """The row as a plain dict, one key per field (a JSON/CSV record)."""
        return asdict(self)


COLUMNS: tuple[str, ...] = (
    "defence",
    "head_layers",
    "sigma",
    "relative_sigma",
    "clip_norm",
    "epsilon",
    "attack",
    "attacker_head",
    "token_accuracy",
    "rouge_l",
    "exact",
    "utility",
    "utility_name",
    "seconds",
)


def best_attacks(rows: Sequence[GridRow]) -> list[GridRow]:
    """For each (defence, p, sigma), the row of the attack (and attacker head) with the highest token accuracy."""
    best: dict[tuple[str, int, float], GridRow] = {}
    for row in rows:
        key = (row.defence, row.head_layers, row.sigma)
        if key not in best or row.token_accuracy > best[key].token_accuracy:
            best[key] = row
    return list(best.values())


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[GridRow]) -> str:
    """One line per (defence, p, sigma, attack)."""
    head = ["defence", "p", "sigma", "sigma/rms", "epsilon", "attack", "attacker's head"]
    head += ["token acc", "ROUGE-L", "exact", "utility"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.defence, r.head_layers, r.sigma, r.relative_sigma, r.epsilon, r.attack, r.attacker_head]
        cells += [r.token_accuracy, r.rouge_l, r.exact, r.utility]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    if rows:
        lines.append(f"\nutility: {rows[0].utility_name}")
    return "\n".join(lines) + "\n"


def plot_privacy_utility(rows: Sequence[GridRow], path: Path) -> None:
    """Best attack's token accuracy against utility, one curve per (defence, p)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[tuple[str, int], list[GridRow]] = defaultdict(list)
    for row in best_attacks(rows):
        curves[(row.defence, row.head_layers)].append(row)
    fig, ax = plt.subplots(figsize=(6.4 if len(curves) <= 6 else 9.6, 4.8))
    # 20 distinct colours: merged grids have many curves. tab20 is a ListedColormap; the stub returns the base class.
    colors = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]
    for i, ((defence, p), points) in enumerate(sorted(curves.items())):
        points.sort(key=lambda r: r.sigma)
        xs, ys = [r.utility for r in points], [r.token_accuracy for r in points]
        ax.plot(xs, ys, marker="o", color=colors[i % len(colors)], label=f"{defence}, p={p}")
        for r in points:
            ax.annotate(f"{r.sigma:.3g}", (r.utility, r.token_accuracy), fontsize=7, alpha=0.7)
    ax.axhline(0.1, linestyle="--", color="gray", linewidth=0.8, label="target: best attack <= 10% of tokens")
    name = rows[0].utility_name if rows else "utility"
    if "perplexity" in name and rows and all(r.utility > 0 for r in rows):
        ax.set_xscale("log")
    ax.set_xlabel(name)
    ax.set_ylabel("best attack's token accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("privacy vs utility (labels: sigma)")
    ax.grid(alpha=0.3)
    if len(curves) <= 6:
        ax.legend(fontsize=8)
    else:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: Sequence[GridRow], out_dir: Path) -> dict[str, Path]:
    """Write ``attack_grid.csv``, ``attack_grid.md``, ``attack_grid.json`` and ``privacy_utility.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": out_dir / "attack_grid.csv",
        "md": out_dir / "attack_grid.md",
        "json": out_dir / "attack_grid.json",
        "png": out_dir / "privacy_utility.png",
    }
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow(row.to_dict())
    paths["md"].write_text(markdown_table(rows))
    paths["json"].write_text(json.dumps([r.to_dict() for r in rows], indent=1))
    plot_privacy_utility(rows, paths["png"])
    return paths


def load_rows(path: Path, label: str | None = None) -> list[GridRow]:
    """The rows of an ``attack_grid.json``; with ``label``, each defence is renamed ``"<defence> (<label>)"``
    so that grids run with other budgets or victim heads draw as curves of their own."""
    rows = [GridRow(**record) for record in json.loads(Path(path).read_text())]
    if label:
        rows = [dataclasses.replace(r, defence=f"{r.defence} ({label})") for r in rows]
    return rows
