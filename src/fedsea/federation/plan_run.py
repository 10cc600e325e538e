"""``fedsea plan`` for a run file: profiles, links and grids in, every cut's prediction and a recommendation out.

The run file gives the model, each client's batch and length, device and dtype, the LoRA, the
wire's dtype and emulated link, the mode, the local steps and the noise level. Profiles come
from files (``fedsea profile --out FILE`` on each machine) or are measured here, one per batch
shape and placement. ``write_cuts`` puts the recommended (p, q) of each client into a run file.
"""

from __future__ import annotations

import dataclasses
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
    grids: str  # where the leakage column comes from

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
            "grids": self.grids,
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
    links = dict(links or {})
    names = [plan.name for plan in run.client_plans()]
    for keys, what in ((set(client_profiles), "--client-profile"), (set(links), "--link")):
        unknown = sorted(keys - {*names, "*"})
        if unknown:
            raise ValueError(f"{what} names {', '.join(unknown)}, not a client of the run ({', '.join(names)})")
    measured: dict[ShapeKey, PartyProfile] = {}
    sources: dict[str, str] = {}
    lora = run.lora.parts()

    def measure(batch: int, tokens: int, device: str, dtype: str, who: str) -> PartyProfile:
        key = (batch, tokens, device, dtype)  # as the run file names them: one profile per placement
        if key not in measured:
            if progress is not None:
                progress(f"profiling {run.model.source} at batch {batch} x {tokens} tokens ({device}) for {who}")
            measured[key] = measure_profile(
                run.model.source, batch, tokens, lora, device, dtype, run.wire.dtype, repeats, progress,
                run.wire.compression,
            )  # fmt: skip
        return measured[key]

    client_profiles = {name: fit_profile(one, run) for name, one in client_profiles.items()}
    server_profiles = [fit_profile(one, run) for one in server_profiles]
    servers = {(p.batch, p.tokens): p for p in server_profiles}
    parties = []
    for plan in run.client_plans():
        shape = (plan.batch_size, plan.max_length)
        profile = client_profiles.get(plan.name) or client_profiles.get("*")
        if profile is None:
            placement = plan.placement()
            profile = measure(*shape, placement.device, placement.dtype, plan.name)
            sources[plan.name] = "measured here"
        else:
            sources[plan.name] = "file"
        if (profile.batch, profile.tokens) != shape:
            raise ValueError(
                f"{plan.name}'s profile is at batch {profile.batch} x {profile.tokens} tokens, the run's at "
                f"{shape[0]} x {shape[1]}: profile it at the run's ([client] batch_size, max_length)"
            )
        server = servers.get(shape)
        if server is None:
            if server_profiles:
                raise ValueError(
                    f"no server profile at {plan.name}'s batch {shape[0]} x {shape[1]} tokens: give one with "
                    "--server-profile (`fedsea profile --role server` with that --batch and --tokens)"
                )
            placed = run.server_model()
            server = servers[shape] = measure(*shape, placed.device, placed.dtype, "the server")
            sources["server"] = "measured here"
        else:
            sources["server"] = "file"
        parties.append(Party(plan.name, profile, _link(run, plan.name, profile, links), server))
    level = run_level(run)
    rows = read_rows(grids, run.model.source, strict=True) if level is not None else []
    leakage = best_recovery(rows, level, run.privacy.head_regularizer, run.noise.clip_norm) if level else {}
    cuts = all_cuts(parties[0].server.num_layers, max_layers)
    table, chosen, round_s = recommend(
        parties, cuts, leakage, run.federation.mode, run.federation.local_steps, constraints,
        common_cut=run.lora.parts().uniform_spec is None,
    )  # fmt: skip
    return PlanResult(
        mode=run.federation.mode,
        local_steps=run.federation.local_steps,
        level=level.describe() if level is not None else "an epsilon target (no grid level)",
        grids=f"{len(grids)} attack grid files of {run.model.source}"
        if rows
        else f"no attack grid of {run.model.source} (pass --grid attack_grid.json from `fedsea attack`)",
        table=table,
        chosen=chosen,
        round_s=round_s,
        profiles=sources,
    )


def _link(run: RunConfig, name: str, profile: PartyProfile, links: Mapping[str, Link]) -> Link:
    """The client's link: ``--link``, else the one its profile measured plus the run's emulated
    ``[wire]`` latency and bandwidth on top of it (the run adds them on every client), else the emulated."""
    given = links.get(name) or links.get("*")
    if given is not None:
        return given
    emulated = Link(run.wire.latency_ms, run.wire.mbps)
    if profile.link_latency_ms is None:
        return emulated
    limits = [m for m in (profile.link_mbps, emulated.mbps) if m is not None]
    return Link(profile.link_latency_ms + emulated.latency_ms, min(limits) if limits else None)


def _same_shape(profiled: str, planned: str) -> bool:
    """Whether ``profiled`` is ``planned`` or a ``random:`` source of the same shape with fewer blocks
    (``random:llama-2-70b?layers=8`` for ``random:llama-2-70b``): its blocks cost what the whole
    model's do, so a few blocks profile a model too large for the machine."""
    if profiled == planned:
        return True
    if not (profiled.startswith("random:") and planned.startswith("random:")):
        return False
    from fedsea.model.synthetic import parse_random_source

    return parse_random_source(profiled).name == parse_random_source(planned).name


def fit_profile(profile: PartyProfile, run: RunConfig) -> PartyProfile:
    """``profile`` for ``run``'s model: refused if made for another model, LoRA, wire dtype or
    compression; a profile of fewer blocks of the same ``random:`` shape is given the run's block count."""
    from fedsea.model.load import model_num_layers

    wanted = {
        "LoRA": (profile.lora, run.lora.parts().summary()),
        "wire compression": (profile.compression, run.wire.compression),
    }
    if run.wire.dtype != "auto":
        wanted["wire dtype"] = (profile.wire_dtype, run.wire.dtype)
    if not _same_shape(profile.model, run.model.source):
        wanted["model"] = (profile.model, run.model.source)
    for what, (theirs, ours) in wanted.items():
        if theirs != ours:
            raise ValueError(
                f"a profile is of {what} {theirs!r}, the run's is {ours!r}: profile again with `fedsea profile --run`"
            )
    layers = model_num_layers(run.model.source)
    if profile.num_layers != layers:
        if profile.model == run.model.source:
            raise ValueError(f"a profile has {profile.num_layers} blocks, {run.model.source} {layers}: profile again")
        profile = dataclasses.replace(profile, num_layers=layers, model=run.model.source)
    return profile


def check_write_target(path: str | os.PathLike[str]) -> None:
    """Refuse a ``--write`` path that cannot be written, before minutes of profiling."""
    target = Path(path)
    if target.suffix != ".toml":
        raise ValueError(f"--write writes TOML: give a .toml path, got {target}")
    if not target.parent.is_dir():
        raise ValueError(f"--write {target}: folder {target.parent} does not exist")


def write_cuts(
    source: str | os.PathLike[str],
    chosen: Sequence[Prediction],
    out: str | os.PathLike[str],
    overrides: Sequence[str] = (),
) -> Path:
    """Write ``source``'s run file, with ``overrides`` (``section.key=value``) applied, to ``out`` with
    each client's recommended cut in its ``[[clients]]`` table.

    Cut schedules (``cuts``, in ``[client]`` and ``[[clients]]``) are dropped: the recommendation is
    one cut for the whole run. The result is checked by loading it; written atomically, as TOML (the
    source's comments are not kept).
    """
    from fedsea.federation.simconfig import absolute_data_paths, dump_tree, load_config
    from fedsea.settings import apply_override, read_settings_file

    check_write_target(out)
    tree = read_settings_file(source)
    for assignment in overrides:
        apply_override(tree, assignment)
    if isinstance(tree.get("client"), dict):
        tree["client"].pop("cuts", None)
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
    tmp = target.with_name(f".{target.name}.check.toml")
    atomic_write_text(tmp, text)
    try:
        load_config(tmp)  # the written file loads: every recommended cut fits the run's checks
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(target, text)
    return target
