"""``fedsea plan`` for a run file: profiles, links and grids in, every cut's prediction and a recommendation out.

The run file gives the model, each client's batch and length, device and dtype, the LoRA, the
wire's dtype and emulated link, the mode, the local steps and the noise level. Profiles come
from files (``fedsea profile --out FILE`` on each machine) or are measured here, one per batch
shape and placement. ``write_cuts`` puts the recommended (p, q) of each client into a run file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsea.federation.plan_leakage import NoiseLevel, best_recovery, read_rows
from fedsea.federation.plan_measure import measure_profile
from fedsea.federation.plan_profile import PartyProfile
from fedsea.federation.planner import Constraints, Link, Party, Prediction, all_cuts, recommend
from fedsea.federation.runconfig import RunConfig
from fedsea.io import atomic_write_text

# A profile is keyed by what it was measured at: (batch, tokens, device, dtype).
ShapeKey = tuple[int, int, str, str]


@dataclass(frozen=True)
class PlanResult:
    """Every client's predictions (fastest first), the recommended cut of each and the round's seconds."""

    mode: str
    local_steps: int
    level: str
    table: dict[str, list[Prediction]]
    chosen: list[Prediction]
    round_s: float
    profiles: dict[str, str]  # party -> where its profile came from

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``fedsea plan --json``."""
        return {
            "mode": self.mode,
            "local_steps": self.local_steps,
            "noise": self.level,
            "round_s": round(self.round_s, 4),
            "recommended": [c.to_dict() for c in self.chosen],
            "cuts": {name: [x.to_dict() for x in rows] for name, rows in self.table.items()},
            "profiles": self.profiles,
        }


def run_level(run: RunConfig) -> NoiseLevel | None:
    """The run's noise level on h_p as the attack grids record it (None for an epsilon target)."""
    if run.noise.relative_sigma is not None:
        return NoiseLevel(relative=run.noise.relative_sigma)
    if run.noise.sigma is not None:
        return NoiseLevel(sigma=run.noise.sigma)
    return NoiseLevel(sigma=0.0) if run.noise.epsilon is None else None


def plan_run(
    run: RunConfig,
    client_profiles: Mapping[str, PartyProfile] | None = None,
    server_profiles: Sequence[PartyProfile] = (),
    links: Mapping[str, Link] | None = None,
    grids: Sequence[Path] = (),
    constraints: Constraints | None = None,
    max_layers: int | None = 6,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> PlanResult:
    """Predict every cut of every client of ``run`` and recommend one each (see ``fedsea.federation.planner``).

    Args:
        run: the run.
        client_profiles: client name (``client-0``, ...) -> its profile; ``*`` for every client.
            Missing clients are measured here at their batch shape and placement.
        server_profiles: the server's profiles, one per batch shape; a shape without one is measured here
            at ``[server]``'s device and dtype.
        links: client name (or ``*``) -> its link; default: the link its profile measured, else
            ``[wire] latency_ms`` and ``mbps``.
        grids: ``attack_grid.json`` files for the leakage column.
        constraints: ceilings on leakage and client memory.
        max_layers: the largest p and q considered (None: every cut the model allows).
        repeats: timed steps per profiled cut when measuring.
        progress: called with a short line before each measurement.
    """
    client_profiles = dict(client_profiles or {})
    measured: dict[ShapeKey, PartyProfile] = {}
    sources: dict[str, str] = {}
    lora = run.lora.base()

    def measure(batch: int, tokens: int, device: str, dtype: str, who: str) -> PartyProfile:
        key = (batch, tokens, device, dtype)  # as the run file names them: one profile per placement
        if key not in measured:
            if progress is not None:
                progress(f"profiling {run.model.source} at batch {batch} x {tokens} tokens ({device}) for {who}")
            measured[key] = measure_profile(
                run.model.source, batch, tokens, lora, device, dtype, run.wire.dtype, repeats, progress
            )
        return measured[key]

    servers = {(p.batch, p.tokens): p for p in server_profiles}
    parties = []
    for plan in run.client_plans():
        profile = client_profiles.get(plan.name) or client_profiles.get("*")
        if profile is None:
            placement = plan.placement()
            profile = measure(plan.batch_size, plan.max_length, placement.device, placement.dtype, plan.name)
            sources[plan.name] = "measured here"
        else:
            sources[plan.name] = "file"
        if (profile.batch, profile.tokens) != (plan.batch_size, plan.max_length):
            raise ValueError(
                f"{plan.name}'s profile is at batch {profile.batch} x {profile.tokens} tokens, the run's at "
                f"{plan.batch_size} x {plan.max_length}: profile it at the run's ([client] batch_size, max_length)"
            )
        server = servers.get((plan.batch_size, plan.max_length))
        if server is None:
            placed = run.server_model()
            server = measure(plan.batch_size, plan.max_length, placed.device, placed.dtype, "the server")
            servers[(plan.batch_size, plan.max_length)] = server
            sources.setdefault("server", "measured here")
        else:
            sources.setdefault("server", "file")
        link = (links or {}).get(plan.name) or (links or {}).get("*")
        if link is None and profile.link_latency_ms is not None:  # measured by `fedsea profile --server`
            link = Link(profile.link_latency_ms, profile.link_mbps)
        link = link or Link(run.wire.latency_ms, run.wire.mbps)
        parties.append(Party(plan.name, profile, link, server))
    level = run_level(run)
    leakage = best_recovery(read_rows(grids, run.model.source), level) if level is not None and grids else {}
    cuts = all_cuts(parties[0].server.num_layers, max_layers)
    table, chosen, round_s = recommend(
        parties, cuts, leakage, run.federation.mode, run.federation.local_steps, constraints
    )
    return PlanResult(
        mode=run.federation.mode,
        local_steps=run.federation.local_steps,
        level=level.describe() if level is not None else "an epsilon target (no grid level)",
        table=table,
        chosen=chosen,
        round_s=round_s,
        profiles=sources,
    )


def write_cuts(source: str | os.PathLike[str], chosen: Sequence[Prediction], out: str | os.PathLike[str]) -> Path:
    """Write ``source``'s run file to ``out`` with each client's recommended cut in its ``[[clients]]`` table.

    A client's ``cuts`` schedule is dropped (the recommendation is one cut for the whole run). The
    result is checked by loading it; written atomically, as TOML (the source's comments are not kept).
    """
    from fedsea.federation.simconfig import absolute_data_paths, dump_tree, load_config
    from fedsea.settings import read_settings_file

    tree = read_settings_file(source)
    if Path(out).resolve().parent != Path(source).resolve().parent:
        absolute_data_paths(tree, Path(source).parent)  # relative data paths keep pointing at the same files
    clients = list(tree.get("clients") or [])
    by_name = {c.client: c for c in chosen}
    for i in range(len(by_name)):
        entry = dict(clients[i]) if i < len(clients) else {}
        pick = by_name.get(f"client-{i}")
        if pick is None:
            raise ValueError(f"no recommendation for client-{i}")
        entry.pop("cuts", None)
        entry.update(head_layers=pick.head_layers, tail_layers=pick.tail_layers)
        if i < len(clients):
            clients[i] = entry
        else:
            clients.append(entry)
    tree["clients"] = clients
    text = dump_tree(tree)
    target = Path(out)
    if target.suffix not in (".toml", ""):
        raise ValueError(f"--write writes TOML: give a .toml path, got {target}")
    tmp = target.with_name(f".{target.name}.check.toml")
    atomic_write_text(tmp, text)
    try:
        load_config(tmp)  # the written file loads: every recommended cut fits the run's checks
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(target, text)
    return target
