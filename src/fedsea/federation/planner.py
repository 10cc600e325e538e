"""Predicted step times of every cut, and a recommended cut per client: ``fedsea plan``'s model.

One split training step of a client at cut (p, q) (``fedsea.training.step``) is, in turn: the
client's head forward, h~_p up, the server's trunk forward, h_{L-q} down, the client's tail
forward and backward, dL/dh_{L-q} up, the trunk's backward and AdamW step, dL/dh~_p down, the
client's head backward and AdamW steps. Nothing overlaps, so

    step = client compute + wire + server compute + waiting

with each compute term read off a measured profile (``fedsea.federation.plan_profile``: a line in
the blocks of each segment), the wire as four (B, n, d) messages of one-way latency plus size over
bandwidth plus the codec's CPU time, and waiting as the time the server spends on other clients
(one compute thread serves every session, ``fedsea.server.trunk``):

- ``sequential``: clients take turns; no waiting; a round lasts the sum of their steps;
- ``hierarchical``: clients step at once; each arrival at the server finds another client's
  forward or backward under way with that client's share of the server's time, and waits its
  mean residual (a queue with one server; the server's total work per step bounds it below);
- ``client-batch``: one joined trunk pass per step; every client waits for the slowest to arrive
  and for the whole joined batch (its cost, the sum of the clients' trunk times).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedsea.federation.plan_profile import PartyProfile

MESSAGES_PER_STEP = 4  # h~_p up, h_{L-q} down, dL/dh_{L-q} up, dL/dh~_p down
# Predicted rounds this close (a fraction) to the fastest are a tie: the profile's own noise is of
# this order (BENCHMARKS.md, fedsea bench plan: predictions within 5% of measured steps).
TIE = 0.02


@dataclass(frozen=True)
class Link:
    """A client's network to the server: one-way latency (ms) and bandwidth (Mbit/s; None: unlimited)."""

    latency_ms: float = 0.0
    mbps: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise ValueError(f"latency must be >= 0 ms, got {self.latency_ms}")
        if self.mbps is not None and not (math.isfinite(self.mbps) and self.mbps > 0):
            raise ValueError(f"bandwidth must be > 0 Mbit/s or unlimited, got {self.mbps}")

    def message_s(self, nbytes: int) -> float:
        """Seconds one message of ``nbytes`` takes one way."""
        return self.latency_ms / 1000 + (nbytes * 8 / (self.mbps * 1e6) if self.mbps else 0.0)

    @staticmethod
    def parse(text: str) -> Link:
        """``LATENCY_MS`` or ``LATENCY_MS:MBPS`` (e.g. ``20`` or ``20:100``)."""
        latency, _, mbps = text.partition(":")
        try:
            return Link(float(latency), float(mbps) if mbps else None)
        except ValueError as exc:
            raise ValueError(f"a link is LATENCY_MS or LATENCY_MS:MBPS (e.g. 20:100), got {text!r}: {exc}") from None


@dataclass(frozen=True)
class Party:
    """A client as the planner sees it: its name, its profile, its link, and the server's profile at its batch shape."""

    name: str
    profile: PartyProfile
    link: Link
    server: PartyProfile

    def __post_init__(self) -> None:
        c, s = self.profile, self.server
        if (c.model, c.num_layers, c.hidden_size, c.batch, c.tokens) != (
            s.model,
            s.num_layers,
            s.hidden_size,
            s.batch,
            s.tokens,
        ):
            raise ValueError(
                f"{self.name}'s profile is of {c.model} at batch {c.batch} x {c.tokens} tokens, the server's of "
                f"{s.model} at {s.batch} x {s.tokens}: profile both at the run's model, batch and length"
            )


@dataclass(frozen=True)
class Prediction:
    """One client's predicted step at one cut (seconds and bytes); ``leakage`` None: not measured."""

    client: str
    head_layers: int
    tail_layers: int
    step_s: float
    client_s: float
    wire_s: float
    server_s: float
    server_forward_s: float
    waiting_s: float
    client_memory_bytes: int
    client_process_bytes: int
    server_memory_bytes: int
    bytes_per_step: int
    leakage: float | None

    @property
    def cut(self) -> tuple[int, int]:
        """(p, q)."""
        return (self.head_layers, self.tail_layers)

    def to_dict(self) -> dict[str, object]:
        """Plain data, seconds rounded to 0.1 ms."""
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def all_cuts(num_layers: int, max_layers: int | None = None) -> list[tuple[int, int]]:
    """Every (p, q) with p, q >= 1 (at most ``max_layers`` each) and p + q < L."""
    top = num_layers - 2 if max_layers is None else min(max_layers, num_layers - 2)
    return [(p, q) for p in range(1, top + 1) for q in range(1, top + 1) if p + q < num_layers]


def _server_parts(server: PartyProfile, trunk_blocks: int) -> tuple[float, float]:
    """(forward, backward + AdamW) seconds of the trunk's two calls at ``trunk_blocks``."""
    s = server.seconds
    return s["trunk_forward"].at(trunk_blocks), s["trunk_backward"].at(trunk_blocks) + s["trunk_optimizer"].at(
        trunk_blocks
    )


def base_prediction(party: Party, cut: tuple[int, int], leakage: float | None = None) -> Prediction:
    """The step of ``party`` at ``cut`` with the server to itself (no waiting)."""
    p, q = cut
    c, server = party.profile, party.server
    layers = server.num_layers
    if p < 1 or q < 1 or p + q >= layers:
        raise ValueError(f"cut (p, q) = {cut} does not fit a model of {layers} blocks (p, q >= 1, p + q < L)")
    s = c.seconds
    client = (
        s["head_forward"].at(p)
        + s["head_backward"].at(p)
        + s["tail_forward"].at(q)
        + s["tail_backward"].at(q)
        + s["client_optimizer"].at(p + q)
    )
    forward, backward = _server_parts(server, layers - p - q)
    message = c.message_bytes
    # Each message is encoded on one side and decoded on the other: the codec time is profiled per
    # message (both ends); the client's profile stands for both machines' CPUs.
    wire = MESSAGES_PER_STEP * (party.link.message_s(message) + c.codec_s)
    adapters = 4 * (p + q) * c.block_adapter_bytes  # LoRA tensors, their gradients, AdamW's two moments
    # The step's own tensors: h_p, h~_p, the received h_{L-q} and its gradient, in the model's dtype.
    buffers = 4 * c.batch * c.tokens * c.hidden_size * _itemsize(c.dtype)
    parts = (
        c.client_fixed_weight_bytes
        + (p + q) * c.block_weight_bytes
        + adapters
        + int(c.activation_bytes["head"].at(p) + c.activation_bytes["tail"].at(q))
        + buffers
    )
    # fedsea's client process loads the whole base model (a cut can move between rounds): the
    # trunk's blocks' weights are in its memory too.
    process = parts + (layers - p - q) * c.block_weight_bytes
    # The server holds the whole base model too, and for this client's session the trunk
    # adapter with its gradient and AdamW state, and the trunk's saved activations.
    trunk = layers - p - q
    serving = (
        server.client_fixed_weight_bytes
        + layers * server.block_weight_bytes
        + 4 * trunk * server.block_adapter_bytes
        + int(server.activation_bytes["trunk"].at(trunk))
        + 4 * message  # the step's received and sent tensors
    )
    return Prediction(
        client=party.name,
        head_layers=p,
        tail_layers=q,
        step_s=client + wire + forward + backward,
        client_s=client,
        wire_s=wire,
        server_s=forward + backward,
        server_forward_s=forward,
        waiting_s=0.0,
        client_memory_bytes=int(parts),
        client_process_bytes=int(process),
        server_memory_bytes=int(serving),
        bytes_per_step=MESSAGES_PER_STEP * message,
        leakage=leakage,
    )


def _itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 8 if dtype == "float64" else 2


def _queued(bases: Sequence[float], serve: Sequence[float], forward: Sequence[float]) -> list[float]:
    """Steps of units sharing the server's one compute thread, each alone taking ``bases[i]`` seconds of
    which ``serve[i]`` on the server (``forward[i]`` in its forward call, the rest in its backward)."""
    # The residual of a unit's service found under way: its two calls (forward, backward) of
    # lengths f and b, met in proportion to their length, are half done on average.
    residual = []
    for total, f in zip(serve, forward, strict=True):
        b = total - f
        residual.append((f * f + b * b) / (2 * (f + b)) if f + b > 0 else 0.0)
    steps = list(bases)
    floor = sum(serve)  # the server does every unit's trunk work each step
    n = len(bases)
    for _ in range(100):  # a fixed point: busier neighbours, longer steps, fewer arrivals
        waits = [2 * sum(serve[j] / steps[j] * residual[j] for j in range(n) if j != i) for i in range(n)]
        new = [max(base + w, floor) for base, w in zip(bases, waits, strict=True)]
        if max(abs(a - b) for a, b in zip(new, steps, strict=True)) < 1e-9:
            break
        steps = new
    return steps


def with_waiting(chosen: Sequence[Prediction], mode: str) -> list[Prediction]:
    """``chosen`` (one prediction per client, each at its own cut) with each one's waiting for the others."""
    if mode not in ("sequential", "client-batch", "hierarchical"):
        raise ValueError(f"mode must be sequential, client-batch or hierarchical, got {mode!r}")
    if mode == "sequential" or len(chosen) < 2:
        return list(chosen)
    if mode == "hierarchical":
        steps = _queued([c.step_s for c in chosen], [c.server_s for c in chosen], [c.server_forward_s for c in chosen])
        return [dataclasses.replace(c, waiting_s=s - c.step_s, step_s=s) for c, s in zip(chosen, steps, strict=True)]
    # client-batch: the clients at one cut (one trunk range) form a group whose batches the server
    # joins into one pass per step, after the group's last h_p arrives (the pass costs the sum);
    # groups at different cuts share the compute thread as hierarchical clients do.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(chosen):
        groups.setdefault((c.head_layers, c.tail_layers), []).append(i)
    members = list(groups.values())
    serve = [sum(chosen[i].server_s for i in group) for group in members]
    forward = [sum(chosen[i].server_forward_s for i in group) for group in members]
    bases = [
        max(chosen[i].client_s + chosen[i].wire_s for i in group) + s for group, s in zip(members, serve, strict=True)
    ]
    steps = _queued(bases, serve, forward)
    out = list(chosen)
    for group, step in zip(members, steps, strict=True):
        for i in group:
            out[i] = dataclasses.replace(chosen[i], waiting_s=step - chosen[i].step_s, step_s=step)
    return out


def round_seconds(chosen: Sequence[Prediction], mode: str, local_steps: int) -> float:
    """A round's time: the clients in turn (``sequential``), or the slowest of them at once."""
    if not chosen:
        return 0.0
    if mode == "sequential":
        return local_steps * sum(c.step_s for c in chosen)
    return local_steps * max(c.step_s for c in chosen)


@dataclass(frozen=True)
class Constraints:
    """Ceilings on a client's cut: best-attack token recovery (0-1) and client memory (bytes)."""

    max_leakage: float | None = None
    max_client_memory: int | None = None

    def allows(self, prediction: Prediction) -> bool:
        """Whether ``prediction``'s cut is within the ceilings (under a leakage ceiling, unmeasured is not)."""
        if self.max_leakage is not None and (prediction.leakage is None or prediction.leakage > self.max_leakage):
            return False
        return self.max_client_memory is None or prediction.client_process_bytes <= self.max_client_memory


def fits(party: Party, prediction: Prediction) -> bool:
    """Whether the cut fits both machines' memory as profiled (unknown memory: assumed to fit)."""
    client, server = party.profile.memory_bytes, party.server.memory_bytes
    return (client is None or prediction.client_process_bytes <= client) and (
        server is None or prediction.server_memory_bytes <= server
    )


def recommend(
    parties: Sequence[Party],
    cuts: Sequence[tuple[int, int]],
    leakage: Mapping[int, float],
    mode: str,
    local_steps: int,
    constraints: Constraints | None = None,
    common_cut: bool = False,
    tie: float = TIE,
) -> tuple[dict[str, list[Prediction]], list[Prediction], float]:
    """Every cut's prediction per client, the recommended cut of each (with waiting) and the round's seconds.

    The recommended cuts minimise the round's time under ``constraints``: each client's fastest
    allowed cut, then (modes where clients share the server at once) a few passes in which each
    client in turn moves to the cut that shortens the round given the others' (ties: the shorter
    sum of steps). With ``common_cut`` (a run whose parts' LoRA differ: every client at one cut),
    the one cut allowed for everyone with the shortest round. Each row of the returned table is
    that client's step at that cut with the others at their recommended cuts (waiting included).
    Rounds within ``tie`` (a fraction) of the fastest are a tie, broken toward the least client
    compute.

    Raises:
        ValueError: a client has no cut within the constraints (the message names the ceiling).
    """
    base = {}
    for party in parties:
        rows = [base_prediction(party, cut, leakage.get(cut[0])) for cut in cuts]
        base[party.name] = [x for x in rows if fits(party, x)]  # the feasible cuts
        if not base[party.name]:
            least = min(rows, key=lambda x: x.client_process_bytes)
            client, server = least.client_process_bytes / 2**30, least.server_memory_bytes / 2**30
            raise ValueError(
                f"{party.name}: no cut fits the memory profiled (the least needs {client:.2f} GiB on the client and "
                f"{server:.2f} GiB on the server): a smaller batch or length, or a machine with more memory"
            )
    constraints = constraints or Constraints()
    allowed = {name: [x for x in rows if constraints.allows(x)] for name, rows in base.items()}
    for name, rows in allowed.items():
        if not rows:
            raise ValueError(_none_allowed(name, base[name], constraints))

    def cost(choice: list[Prediction]) -> float:
        return round_seconds(with_waiting(choice, mode), mode, local_steps)

    def lightest(options: list[list[Prediction]]) -> list[Prediction]:
        # Within ``tie`` of the fastest round the difference is within measurement noise: the
        # choice that leaves the clients (the parties with the least hardware) the least compute.
        best = min(cost(o) for o in options)
        close = [o for o in options if cost(o) <= best * (1 + tie)]
        return min(close, key=lambda o: (sum(x.client_s for x in o), cost(o)))

    if common_cut:
        shared = [cut for cut in cuts if all(any(x.cut == cut for x in allowed[p.name]) for p in parties)]
        if not shared:
            raise ValueError("the parts' LoRA differ, so every client needs one cut, and no cut meets every ceiling")
        at = {p.name: {x.cut: x for x in base[p.name]} for p in parties}
        chosen = lightest([[at[p.name][cut] for p in parties] for cut in shared])
    else:
        chosen = [lightest([[x] for x in allowed[party.name]])[0] for party in parties]
        if mode != "sequential" and len(parties) > 1:
            for _ in range(3):
                moved = False
                for i, party in enumerate(parties):
                    options = [[*chosen[:i], x, *chosen[i + 1 :]] for x in allowed[party.name]]
                    pick = lightest(options)
                    if pick[i] is not chosen[i] and cost(pick) < cost(chosen) * (1 - tie / 10):
                        chosen, moved = pick, True
                if not moved:
                    break
    waited = with_waiting(chosen, mode)
    table = {
        party.name: sorted(
            (with_waiting([*chosen[:i], x, *chosen[i + 1 :]], mode)[i] for x in base[party.name]),
            key=lambda x: x.step_s,
        )
        for i, party in enumerate(parties)
    }
    return table, waited, round_seconds(waited, mode, local_steps)


def _none_allowed(name: str, rows: list[Prediction], constraints: Constraints) -> str:
    parts = []
    if constraints.max_leakage is not None:
        measured = [x.leakage for x in rows if x.leakage is not None]
        low = f"the lowest measured is {min(measured):.3f}" if measured else "no cut has a measured figure"
        parts.append(f"a leakage ceiling of {constraints.max_leakage} ({low}; measure more with `fedsea attack`)")
    if constraints.max_client_memory is not None:
        least = min(x.client_process_bytes for x in rows) / 2**30
        parts.append(f"a client memory ceiling of {constraints.max_client_memory / 2**30:.2f} GiB (least {least:.2f})")
    return f"{name}: no cut meets {' and '.join(parts)}; raise the ceiling"
