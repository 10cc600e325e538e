"""The config tree of a federated run: one frozen dataclass per run-file section.

``RunConfig`` is the run file's schema (``fedsea config example`` prints it, documented); each
section validates itself at construction, and ``fedsea.settings`` loads it from TOML, YAML and
``section.key=value`` overrides (``fedsea.federation.simconfig``). Where a section is a library
config (``LoraSpec``, ``OptimConfig``, ``ServerLimits``, ``SplitConfig``, ``WireConfig``), the run
file's defaults are stated once here, in ``RunConfig``'s field defaults. They differ from the
library's on purpose where a run should start from a useful setting and the Python API from the
neutral one:

- ``[lora] dropout = 0.0`` (``LoraSpec``: 0.05): federated rounds are short, and dropout noise
  on top of the noise on h_p slowed the demo's convergence;
- ``[optim] lr = 1e-3`` (``OptimConfig``: 1e-4): a few rounds of few local steps need the larger
  step;
- ``[noise] relative_sigma = 0.14`` (``NoiseConfig()``: no noise, so that split == centralized by
  default in Python): the recommended default level of PRIVACY.md.

"None" is ``None`` (left out of a file); a 0 that older files wrote for it still reads as None.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from fedsea.config import (
    RECOMMENDED_RELATIVE_SIGMA,
    LoraSpec,
    NoiseConfig,
    OptimConfig,
    Placement,
    ServerLimits,
    SplitConfig,
    SplitLora,
    WireConfig,
)
from fedsea.federation.config import FedConfig
from fedsea.federation.cuts import check_run_cuts, check_schedule, cut_at, cuts_by_round
from fedsea.federation.placement import ModelSettings, ServerSettings, check_placement
from fedsea.federation.privacy_settings import PrivacySettings as PrivacySettings  # re-exported: its home
from fedsea.privacy.target import NoiseTarget
from fedsea.settings import ZERO_IS_NONE, to_tree

# The noise levels of which a run file sets one; the first is the default's.
NOISE_LEVELS: tuple[str, ...] = ("relative_sigma", "sigma", "epsilon")
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "size")
_FED = FedConfig()  # the round policy's defaults are FedConfig's: read, not repeated


@dataclass(frozen=True)
class TaskSettings:
    """The task the clients fine-tune on, and how its training rows are split between them.

    Args:
        name: the task (sst2, boolq, rte, ...; README "Tasks and evaluation").
        train_split: the data split the clients train on.
        train_limit: the first this many training rows are partitioned; unset: all.
        eval_limit: the first this many evaluation rows are scored each round; unset: all.
        partition: ``iid``, ``dirichlet`` (label skew) or ``size`` (quantity skew).
        alpha: the Dirichlet concentration of a skewed partition (smaller: more skewed).
        data: a JSONL file of ``{"text"}`` or ``{"prompt", "completion"}`` rows that every client
            without its own ``[[clients]] data`` trains on instead of the task's partition (a
            relative path is the run file's folder's).
        holdout: the share of each own file's rows (its last ones) held out of training and
            scored each round as the held-out loss (0: none held out, the loss on the training rows).
    """

    name: str = "sst2"
    train_split: str = "train"
    train_limit: int | None = field(default=300, metadata={ZERO_IS_NONE: True})
    eval_limit: int | None = field(default=100, metadata={ZERO_IS_NONE: True})
    partition: str = "iid"
    alpha: float = 0.5
    data: str | None = None
    holdout: float = 0.1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.holdout) and 0 <= self.holdout < 1):
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout!r}")
        for name in ("train_limit", "eval_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or unset (all rows), got {value!r}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")


@dataclass(frozen=True)
class FederationSettings:
    """The rounds (the server's ``FedConfig``, with the run's client count).

    Args:
        clients: how many clients take part (``client-0`` ... ``client-{N-1}``); the first round
            waits for all of them (or for ``join_timeout_s``).
    """

    __doc_sources__ = (FedConfig,)

    clients: int = 3
    rounds: int = _FED.rounds
    local_steps: int = _FED.local_steps
    mode: str = _FED.mode
    strategy: str = _FED.strategy
    fraction: float = _FED.fraction
    min_clients: int = _FED.min_clients
    round_timeout_s: float = _FED.round_timeout_s
    join_timeout_s: float = _FED.join_timeout_s
    clip_norm: float | None = field(default=_FED.clip_norm, metadata={ZERO_IS_NONE: True})
    trim_fraction: float = _FED.trim_fraction
    max_update_rms: float | None = field(default=_FED.max_update_rms, metadata={ZERO_IS_NONE: True})
    max_faults: int | None = field(default=_FED.max_faults, metadata={ZERO_IS_NONE: True})

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"clients must be >= 1, got {self.clients}")
        if not 1 <= self.min_clients <= self.clients:
            raise ValueError(f"min_clients must be in [1, clients = {self.clients}], got {self.min_clients}")
        self.fed_config(0, LoraSpec())  # FedConfig validates the rest

    def fed_config(self, seed: int, lora: LoraSpec | SplitLora, cut: tuple[int, int] | None = None) -> FedConfig:
        """The server's ``FedConfig`` of these settings."""
        policy = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "clients"}
        return FedConfig(**policy, expected_clients=self.clients, seed=seed, lora=lora, cut=cut)


@dataclass(frozen=True)
class LoraPart:
    """One part's LoRA where it differs from ``[lora]``: a key left out is ``[lora]``'s."""

    __doc_sources__ = (LoraSpec,)

    r: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        LoraSpec(**self.given())  # LoraSpec checks the keys given, by their names

    def given(self) -> dict[str, Any]:
        """The keys this table sets."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def over(self, base: LoraSpec) -> LoraSpec:
        """``base`` with this table's keys."""
        return dataclasses.replace(base, **self.given())


@dataclass(frozen=True)
class RunLora(LoraSpec):
    """The LoRA of every part (``[lora]``), with optional per-part tables over it.

    Args:
        head: ``[lora.head]``: the head's LoRA where it differs from ``[lora]`` (e.g. ``r = 4``).
            Parts whose LoRA differs need every client at the same (p, q): the global adapter is
            averaged per block, so a block must be the same part for every client.
        trunk: ``[lora.trunk]``: the trunk's LoRA where it differs from ``[lora]`` (e.g. ``r = 16``).
        tail: ``[lora.tail]``: the tail's LoRA where it differs from ``[lora]``.
    """

    head: LoraPart | None = None
    trunk: LoraPart | None = None
    tail: LoraPart | None = None

    def base(self) -> LoraSpec:
        """``[lora]`` alone, as a plain ``LoraSpec``."""
        return LoraSpec(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=self.target_modules)

    def parts(self) -> SplitLora:
        """Each part's spec: ``[lora]`` updated by the part's table."""
        base = self.base()
        head, trunk, tail = (t.over(base) if t is not None else base for t in (self.head, self.trunk, self.tail))
        return SplitLora(head=head, trunk=trunk, tail=tail)


@dataclass(frozen=True)
class ClientConfig(SplitConfig):
    """What every client uses unless its ``[[clients]]`` table says otherwise.

    Args:
        batch_size: sequences per local step.
        max_length: tokens per example, at most (longer ones are cut).
        device: the clients' device (unset: ``[model]``'s): auto (the first GPU, else the CPU), cpu,
            cuda, cuda:N or mps.
        dtype: the clients' dtype (unset: ``[model]``'s): auto (bfloat16 on CUDA, float32 elsewhere),
            float32, bfloat16 or float16.
        cuts: the cut moved between rounds, ``[[round, head_layers, tail_layers], ...]`` in increasing
            round order: each holds from its round to the next entry's (``fedsea.federation.cuts``).
    """

    batch_size: int = 4
    max_length: int = 128
    device: str | None = None
    dtype: str | None = None
    cuts: tuple[tuple[int, int, int], ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_placement(self.device, self.dtype)
        check_schedule(self.cuts)
        if self.cuts is not None:  # tuples, however given (``client_plans`` merges plain lists)
            object.__setattr__(self, "cuts", tuple(tuple(entry) for entry in self.cuts))
        for name in ("batch_size", "max_length"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class ClientOverrides:
    """One client's differences from ``[client]`` (unset: the ``[client]`` value); ``data``: its own
    JSONL file (unset: ``[task] data``, else its share of the task; relative: the run file's folder's)."""

    head_layers: int | None = None
    tail_layers: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    device: str | None = None
    dtype: str | None = None
    cuts: tuple[tuple[int, int, int], ...] | None = None
    data: str | None = None

    def __post_init__(self) -> None:
        check_schedule(self.cuts)


# Each override names a ``ClientConfig`` field (or ``data``): a field added there must be added here.
assert [f.name for f in dataclasses.fields(ClientOverrides)] == [f.name for f in dataclasses.fields(ClientConfig)] + [
    "data"
]


@dataclass(frozen=True)
class ClientPlan(ClientConfig):
    """One client's resolved settings, its name in the run and its own JSONL file (None: the task's share)."""

    name: str = "client-0"
    data: str | None = None

    def placement(self) -> Placement:
        """This client's device and dtype."""
        return Placement(self.device or "auto", self.dtype or "auto")

    def cut_at(self, round_number: int) -> tuple[int, int]:
        """This client's (p, q) in round ``round_number`` (its ``cuts``, else head_layers, tail_layers)."""
        return cut_at(self.cuts, (self.head_layers, self.tail_layers), round_number)


@dataclass(frozen=True)
class NoiseSettings:
    """The noise on h_p (set one of ``relative_sigma``, ``sigma``, ``epsilon``) and on the gradient sent up.

    Args:
        relative_sigma: sigma as a multiple of the RMS of h_p on public text, measured by each client
            at start-up (the recommended default, PRIVACY.md).
        sigma: the absolute standard deviation per coordinate; 0 is no noise.
        epsilon: a differential-privacy target over the run's releases (needs ``clip_norm``).
        delta: the delta of ``epsilon``.
        clip_norm: per-token L2 clip of h_p before the noise; unset: no clipping.
        grad_sigma: std of the noise on the gradient sent up to the trunk (0: none).
        grad_clip_norm: per-token L2 clip of that gradient; unset: no clipping.
    """

    relative_sigma: float | None = RECOMMENDED_RELATIVE_SIGMA
    sigma: float | None = None
    epsilon: float | None = None
    delta: float = 1e-5
    clip_norm: float | None = field(default=None, metadata={ZERO_IS_NONE: True})
    grad_sigma: float = 0.0
    grad_clip_norm: float | None = field(default=None, metadata={ZERO_IS_NONE: True})

    def __post_init__(self) -> None:
        chosen = [name for name in NOISE_LEVELS if getattr(self, name) is not None]
        if not chosen:
            raise ValueError(f"set one noise level of {', '.join(NOISE_LEVELS)} (sigma = 0: no noise)")
        if len(chosen) > 1:
            given = " and ".join(f"noise.{n} = {getattr(self, n):g}" for n in chosen)
            raise ValueError(f"set one noise level of {', '.join(NOISE_LEVELS)}, got {given}")
        self.target()  # NoiseTarget and NoiseConfig validate the values
        self.grad_noise()

    def target(self) -> NoiseTarget:
        """The level on h_p as a ``NoiseTarget``."""
        levels = {n: getattr(self, n) for n in NOISE_LEVELS if getattr(self, n) is not None}
        return NoiseTarget(**levels, delta=self.delta, clip_norm=self.clip_norm)

    def grad_noise(self) -> NoiseConfig:
        """The noise on the gradient sent up."""
        try:
            return NoiseConfig(sigma=self.grad_sigma, clip_norm=self.grad_clip_norm)
        except ValueError as exc:  # NoiseConfig names its own fields: sigma, clip_norm
            raise ValueError(f"grad_{exc}") from None


@dataclass(frozen=True)
class RunWire(WireConfig):
    """The wire of every client (the latency and bandwidth are emulated on each client).

    Args:
        tls: the server and clients talk TLS with throwaway certificates (``fedsea simulate``).
    """

    tls: bool = True


@dataclass(frozen=True)
class RunSettings:
    """The run as a whole.

    Args:
        seed: seeds client sampling, the initial global adapter and the clients' data order.
    """

    seed: int = 0


@dataclass(frozen=True)
class RunConfig:
    """A federated run: every setting of ``fedsea simulate``, ``fedsea serve --run`` and ``fedsea join``.

    Args:
        model: the base model, and the device and dtype of every party.
        task: the task and its partition across the clients.
        federation: the rounds.
        server: the trunk server's device and dtype, where they differ from ``[model]``.
        client: every client's split, batch and length.
        clients: per-client differences from ``[client]`` and each one's own ``data`` file (JSONL), one
            ``[[clients]]`` table per client in order (client-0 first); clients without one use ``[client]``.
        lora: the LoRA of every part; ``[lora.head]``, ``[lora.trunk]``, ``[lora.tail]`` override it for one.
        optim: AdamW of every part.
        noise: the noise on h_p and on the gradient sent up.
        privacy: privacy-trained heads.
        wire: the wire.
        limits: the limits ``fedsea serve --run`` enforces (its flags override them).
        run: the run as a whole.
    """

    model: ModelSettings = field(default_factory=ModelSettings)
    task: TaskSettings = field(default_factory=TaskSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    client: ClientConfig = field(default_factory=ClientConfig)
    clients: tuple[ClientOverrides, ...] = ()
    lora: RunLora = field(default_factory=lambda: RunLora(dropout=0.0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    noise: NoiseSettings = field(default_factory=NoiseSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    wire: RunWire = field(default_factory=RunWire)
    limits: ServerLimits = field(default_factory=ServerLimits)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        count = self.federation.clients
        if len(self.clients) > count:
            raise ValueError(f"{len(self.clients)} [[clients]] tables for federation.clients = {count}")
        check_run_cuts(self.client_plans(), self.federation.rounds)  # each client's merged settings validate
        self.lora_cut()  # parts with different LoRA need one (p, q)

    def client_plans(self) -> tuple[ClientPlan, ...]:
        """Every client's settings: ``[client]`` updated by its ``[[clients]]`` table."""
        plans = []
        for i in range(self.federation.clients):
            given = to_tree(self.clients[i]) if i < len(self.clients) else {}
            placed = {"device": self.model.device, "dtype": self.model.dtype, "data": self.task.data}
            plans.append(ClientPlan(**{**placed, **to_tree(self.client), **given, "name": f"client-{i}"}))
        return tuple(plans)

    def server_model(self) -> ModelSettings:
        """The model as the trunk server loads it: ``[model]`` with ``[server]``'s device and dtype."""
        return self.model.placed(self.server.device, self.server.dtype)

    def lora_cut(self) -> tuple[int, int] | None:
        """Every client's (p, q) when the parts' LoRA differ; None when one spec serves every part."""
        parts = self.lora.parts()
        if parts.uniform_spec is not None:
            return None
        plans = self.client_plans()
        cuts = sorted({cut for c in plans for _, cut in cuts_by_round(c.cuts, (c.head_layers, c.tail_layers))})
        if len(cuts) > 1:
            # The global adapter is keyed by block: at mixed cuts one block would be one client's
            # head and another's trunk, with tensors of two shapes (or scalings) to average.
            raise ValueError(
                f"lora: the parts' LoRA differ ({parts.summary()}) and the clients cut the model at different "
                f"(head_layers, tail_layers) {cuts}; give every client the same head_layers and tail_layers "
                "([client], no per-client ones or cuts in [[clients]]), or one LoRA for all parts (no [lora.head], "
                "[lora.trunk], [lora.tail])"
            )
        return cuts[0]
