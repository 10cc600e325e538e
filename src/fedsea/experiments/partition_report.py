"""The partition-point analysis of attack grids: task quality and leakage against the cut p.

The seed paper reports that more head blocks tolerate more *absolute* noise. An absolute
sigma means different things at different p, because h_p's RMS grows with depth (about 2.1
at p = 1, 3.6 at p = 2, 8.7 at p = 4..6 on SmolLM2), so this report puts every setting of
one or more ``fedsea attack`` grids (defence ``none`` by default) on both axes:

- task quality against absolute sigma, one curve per p;
- task quality against sigma / RMS(h_p), one curve per p;
- the best attack's token accuracy against p, at given relative levels.

It only reads measured rows: a (p, level) that no grid ran is "not measured", never
interpolated. ``fedsea attack-report --by-p`` is its command line (ADAPTIVE.md).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsea.experiments.privacy_report import GridRow

NOT_MEASURED = "not measured"
# Two settings' sigma / RMS count as the same level when within this fraction of it: the
# same relative level measured in two runs (RMS on the same public text) differs by rounding
# only, while the grids' distinct levels (0.14, 0.27, 0.5, ...) are far more than 5% apart.
LEVEL_TOLERANCE = 0.05
# Utilities of one setting in two grids must agree to this (the fine-tuning is seeded and
# deterministic on one machine); a larger gap means grids of different budgets were merged.
UTILITY_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Setting:
    """One (p, sigma) of the merged grids: its quality and its best attack.

    Attributes:
        head_layers: the cut p.
        sigma: absolute noise std per coordinate.
        relative_sigma: sigma / RMS(h_p) (0 when sigma is 0).
        utility: task quality after the grid's fine-tuning budget, noise at the cut.
        best_attack: the attack (and attacker head) with the highest token accuracy.
        token_accuracy: that attack's token accuracy.
        attacks: every attack run at this setting (a best of ``probe`` alone is weaker
            than a best that includes ``bisr``).
    """

    head_layers: int
    sigma: float
    relative_sigma: float
    utility: float
    best_attack: str
    token_accuracy: float
    attacks: tuple[str, ...]


def settings_by_p(rows: Sequence[GridRow], defence: str = "none") -> list[Setting]:
    """Group the rows of ``defence`` by (p, sigma), sorted by p then sigma.

    Raises:
        ValueError: no row of ``defence``; rows of different utilities (tasks or budgets);
            or one (p, sigma) with two different utilities (grids of different budgets merged).
    """
    chosen = [r for r in rows if r.defence == defence]
    if not chosen:
        found = sorted({r.defence for r in rows})
        raise ValueError(f"no row of defence {defence!r} (the grids have {found or 'no rows'})")
    names = sorted({r.utility_name for r in chosen})
    if len(names) > 1:
        raise ValueError(f"rows of different utilities cannot share one axis: {names}")
    groups: dict[tuple[int, float], list[GridRow]] = defaultdict(list)
    for row in chosen:
        if not (math.isfinite(row.sigma) and row.sigma >= 0 and math.isfinite(row.utility)):
            raise ValueError(f"row p={row.head_layers} sigma={row.sigma} has a non-finite sigma or utility")
        groups[(row.head_layers, row.sigma)].append(row)
    out = []
    for (p, sigma), group in sorted(groups.items()):
        utilities = sorted({r.utility for r in group})
        if utilities[-1] - utilities[0] > UTILITY_TOLERANCE:
            raise ValueError(
                f"p={p} sigma={sigma:.4g} has different utilities {utilities}: grids of different "
                "fine-tuning budgets or tasks were merged"
            )
        best = max(group, key=lambda r: r.token_accuracy)
        attacks = tuple(sorted({f"{r.attack}/{r.attacker_head}" for r in group}))
        winner = f"{best.attack}/{best.attacker_head}"
        out.append(Setting(p, sigma, best.relative_sigma, best.utility, winner, best.token_accuracy, attacks))
    return out


def rms_by_p(settings: Iterable[Setting]) -> dict[int, float]:
    """RMS(h_p) per p, as sigma / relative_sigma of its noised settings (p with none are absent)."""
    found: dict[int, list[float]] = defaultdict(list)
    for s in settings:
        if s.sigma > 0 and s.relative_sigma > 0:
            found[s.head_layers].append(s.sigma / s.relative_sigma)
    return {p: sorted(v)[len(v) // 2] for p, v in sorted(found.items())}


def at_level(settings: Iterable[Setting], p: int, level: float) -> Setting | None:
    """The setting of cut ``p`` whose sigma / RMS is nearest ``level`` within ``LEVEL_TOLERANCE``, or None."""
    if not (math.isfinite(level) and level >= 0):
        raise ValueError(f"a level must be a finite number >= 0, got {level!r}")
    near = [
        s
        for s in settings
        if s.head_layers == p and abs(s.relative_sigma - level) <= LEVEL_TOLERANCE * max(level, 1e-12)
    ]
    return min(near, key=lambda s: (abs(s.relative_sigma - level), -s.token_accuracy)) if near else None


def _num(value: float) -> str:
    return f"{value:.3g}"


def _matrix(settings: Sequence[Setting], key: str) -> str:
    """Quality per p (columns) and noise level (rows): ``key`` is ``sigma`` or ``relative_sigma``
    (rounded to 2 significant digits to form a row; two settings in one cell are both shown)."""
    ps = sorted({s.head_layers for s in settings})
    cells: dict[tuple[str, int], list[str]] = defaultdict(list)
    levels: dict[str, float] = {}
    for s in settings:
        value = float(getattr(s, key))
        label = f"{float(f'{value:.2g}'):g}"
        levels[label] = min(levels.get(label, value), value)
        cells[(label, s.head_layers)].append(f"{s.utility:.3f}")
    head = "sigma" if key == "sigma" else "sigma / RMS"
    lines = [f"| {head} | " + " | ".join(f"p = {p}" for p in ps) + " |", "|---|" + "---|" * len(ps)]
    for label in sorted(levels, key=levels.__getitem__):
        row = [" / ".join(cells[(label, p)]) or NOT_MEASURED for p in ps]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(settings: Sequence[Setting], levels: Sequence[float]) -> str:
    """The four tables: every setting; quality vs sigma; quality vs sigma / RMS; best attack vs p per level."""
    if not settings:
        raise ValueError("no settings to report")
    rms = rms_by_p(settings)
    out = ["### Every setting\n", "| p | sigma | sigma / RMS | quality | best attack | token acc | attacks run |"]
    out.append("|---|---|---|---|---|---|---|")
    for s in settings:
        out.append(
            f"| {s.head_layers} | {_num(s.sigma)} | {_num(s.relative_sigma)} | {s.utility:.3f} | "
            f"{s.best_attack} | {s.token_accuracy:.3f} | {', '.join(s.attacks)} |"
        )
    out += ["\n### Quality against sigma\n", _matrix(settings, "sigma")]
    out += ["### Quality against sigma / RMS(h_p)\n", _matrix(settings, "relative_sigma")]
    ps = sorted({s.head_layers for s in settings})
    out += ["### RMS of h_p\n", "| p | " + " | ".join(str(p) for p in ps) + " |", "|---|" + "---|" * len(ps)]
    out.append("| RMS | " + " | ".join(_num(rms[p]) if p in rms else NOT_MEASURED for p in ps) + " |")
    out += ["\n### Best attack's token accuracy against p\n"]
    out += ["| sigma / RMS | " + " | ".join(f"p = {p}" for p in ps) + " |", "|---|" + "---|" * len(ps)]
    for level in levels:
        cells = []
        for p in ps:
            hit = at_level(settings, p, level)
            if hit is None:
                cells.append(NOT_MEASURED)
                continue
            where = f"{hit.best_attack}, {_num(hit.relative_sigma)}; quality {hit.utility:.3f}"
            cells.append(f"{hit.token_accuracy:.3f} ({where})")
        out.append(f"| {level:g} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_by_p(
    settings: Sequence[Setting],
    levels: Sequence[float],
    path: Path,
    quality: str = "task quality",
    chance: float | None = None,
) -> None:
    """Three panels: quality vs sigma, quality vs sigma / RMS (one curve per p, symlog x; a dashed
    line at ``chance``, e.g. the majority class, if given), and the best attack's token accuracy
    vs p (one curve per level; unmeasured p are gaps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not settings:
        raise ValueError("no settings to draw")
    ps = sorted({s.head_layers for s in settings})
    colors = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.0))
    for ax, key, label, thresh in (
        (axes[0], "sigma", "sigma (absolute std)", 0.5),
        (axes[1], "relative_sigma", "sigma / RMS(h_p)", 0.1),
    ):
        for i, p in enumerate(ps):
            points = sorted((float(getattr(s, key)), s.utility) for s in settings if s.head_layers == p)
            ax.plot(*zip(*points, strict=True), marker="o", color=colors[i % len(colors)], label=f"p = {p}")
        if chance is not None:
            ax.axhline(chance, linestyle="--", color="gray", linewidth=0.8, label=f"chance ({chance:g})")
        ax.set_xscale("symlog", linthresh=thresh)
        ax.set_xlim(left=0)
        ax.set_xlabel(label)
        ax.set_ylabel(quality, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("quality vs absolute noise")
    axes[1].set_title("quality vs noise relative to RMS(h_p)")
    ax = axes[2]
    winners = [s.best_attack for s in settings]
    usual = max(set(winners), key=winners.count)
    for i, level in enumerate(levels):
        hits = [(p, at_level(settings, p, level)) for p in ps]
        ys = [h.token_accuracy if h is not None else math.nan for _, h in hits]
        ax.plot(ps, ys, marker="s", color=colors[(i + 3) % len(colors)], label=f"sigma = {level:g} x RMS")
        for p, hit in hits:  # name the winner where it is not the usual one (e.g. the probe where BiSR did not run)
            if hit is not None and hit.best_attack != usual:
                ax.annotate(hit.best_attack, (p, hit.token_accuracy), fontsize=7, alpha=0.8)
    ax.set_xticks(ps)
    ax.set_xlabel("cut point p (head blocks)")
    ax.set_ylabel("best attack's token accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"leakage vs p (best: {usual} unless named)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_partition_report(
    rows: Sequence[GridRow],
    out_dir: Path,
    levels: Sequence[float] = (0.14,),
    defence: str = "none",
    chance: float | None = None,
) -> dict[str, Path]:
    """Write ``partition.md`` (the tables) and ``partition.png`` (the three panels) into ``out_dir``.

    Args:
        rows: the rows of one or more attack grids of one task and one fine-tuning budget.
        out_dir: the folder (created).
        levels: sigma / RMS levels of the leakage-vs-p table and panel (each > 0 or 0).
        defence: the defence whose settings are reported (``none``: the paper's noise).
        chance: the quality of a constant guess (sst2's majority class: 0.525 on its first 200
            validation rows), drawn as a dashed line; None draws none.

    Raises:
        ValueError: see ``settings_by_p``; or no level, or a level that is not a finite number >= 0.
    """
    if not levels or any(not (math.isfinite(v) and v >= 0) for v in levels):
        raise ValueError(f"levels must be non-empty finite numbers >= 0, got {list(levels)!r}")
    settings = settings_by_p(rows, defence)
    quality = next(r.utility_name for r in rows if r.defence == defence)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "partition.md", "png": out_dir / "partition.png"}
    paths["md"].write_text(f"quality: {quality}; defence: {defence}\n\n" + markdown_report(settings, levels))
    plot_by_p(settings, levels, paths["png"], quality=quality, chance=chance)
    return paths


__all__ = [
    "NOT_MEASURED",
    "Setting",
    "at_level",
    "markdown_report",
    "plot_by_p",
    "rms_by_p",
    "settings_by_p",
    "write_partition_report",
]
