"""The privacy figure of each head depth p for ``fedsea plan``: the attack grid's best token recovery.

``fedsea attack`` writes its rows as ``attack_grid.json`` (one row per defence, p, sigma, attack
and attacker head; the published grids are ``docs/**/grid-*.json``). For a run's noise level the
figure of a cut is the best token accuracy of any attack (and attacker head) on rows of that p,
that defence and that level; a p without such a row is "not measured". Levels match within 10%:
a grid computes ``relative_sigma`` from the RMS it measured, 0.137 where the run file says 0.14.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedsea.io import read_json

LEVEL_TOLERANCE = 0.10  # relative difference within which two noise levels are the same setting


@dataclass(frozen=True)
class NoiseLevel:
    """The run's noise on h_p: a multiple of the RMS of h_p (``relative``), or an absolute sigma."""

    relative: float | None = None
    sigma: float | None = None

    def __post_init__(self) -> None:
        if (self.relative is None) == (self.sigma is None):
            raise ValueError("give the noise level as relative_sigma or as sigma (one of them)")

    def matches(self, row: dict[str, object]) -> bool:
        """Whether a grid row was measured at this level (within ``LEVEL_TOLERANCE``)."""
        mine, key = (self.relative, "relative_sigma") if self.relative is not None else (self.sigma, "sigma")
        theirs = row.get(key)
        if mine is None or not isinstance(theirs, int | float) or not math.isfinite(theirs):
            return False
        if mine == 0 or theirs == 0:
            return mine == theirs
        return abs(theirs - mine) <= LEVEL_TOLERANCE * mine

    def describe(self) -> str:
        """The level in words."""
        return f"sigma = {self.relative} x RMS of h_p" if self.relative is not None else f"sigma = {self.sigma}"


def default_grids(model: str) -> list[Path]:
    """The grids published with fedsea for ``model`` (``docs/**/grid-*.json`` of a source checkout whose
    saved flags name ``model``), if any."""
    root = Path(__file__).resolve().parents[3] / "docs"
    found = sorted(root.glob("**/grid-*.json")) if root.is_dir() else []
    return [p for p in found if grid_model(p) == model]


def grid_model(path: Path) -> str | None:
    """The model a grid attacked, from the flags saved beside it (``attack_config.json`` next to
    ``attack_grid.json``; ``config-X.json`` next to a published ``grid-X.json``); None if none is."""
    name = path.name
    config = path.with_name("attack_config.json" if name == "attack_grid.json" else name.replace("grid-", "config-", 1))
    if config == path or not config.is_file():
        return None
    try:
        model = json.loads(config.read_text()).get("model")
    except (json.JSONDecodeError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def read_rows(paths: Iterable[Path], model: str | None = None, strict: bool = False) -> list[dict[str, object]]:
    """Every row of the given ``attack_grid.json`` files (a clear error for a file that is not one).

    With ``model``, a file whose saved flags name another model is left out, or with ``strict``
    refused (a grid whose model is not recorded is kept: the caller chose it).
    """
    rows: list[dict[str, object]] = []
    for path in paths:
        data = read_json(path, "give an attack_grid.json of `fedsea attack`")
        if not isinstance(data, list) or not all(isinstance(r, dict) and "head_layers" in r for r in data):
            raise ValueError(f"{path} is not an attack grid (a list of rows with head_layers): give attack_grid.json")
        attacked = grid_model(Path(path))
        if model is not None and attacked not in (None, model):
            if strict:
                raise ValueError(f"{path} attacked {attacked}, the run's model is {model}: give grids of {model}")
            continue
        rows += data
    return rows


def best_recovery(
    rows: Iterable[dict[str, object]], level: NoiseLevel, defence: str = "none", clip_norm: float | None = None
) -> dict[int, float]:
    """p -> the best token accuracy of any attack on ``defence`` at ``level`` and ``clip_norm`` (the
    per-token clipping before the noise; None: none), ps without such a row left out."""
    best: dict[int, float] = {}
    for row in rows:
        accuracy = row.get("token_accuracy")
        p = row.get("head_layers")
        if row.get("defence") != defence or not isinstance(p, int) or not level.matches(row):
            continue
        if row.get("clip_norm") != clip_norm:
            continue
        if isinstance(accuracy, int | float) and math.isfinite(accuracy):
            best[p] = max(best.get(p, 0.0), float(accuracy))
    return best
