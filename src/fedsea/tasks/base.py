"""What a task is: canonical rows, examples built from them, and how predictions are scored.

Design decisions:
- Two layers. *Rows* are plain JSON-able dicts in one canonical schema per task (that of the
  task's Hugging Face dataset, e.g. SuperGLUE's integer labels), whether they were read from
  a local file or the Hub. *Examples* are what a model sees: a user message, and either the
  candidate answers to score (``choices`` and the gold ``label``) or the reference answers to
  generate (``references``).
- Two kinds. ``classify`` tasks are scored by the log-likelihood of each verbalized choice
  (faster and more stable than free generation); ``generate`` tasks by greedy decoding.
- A task's data source is a string: ``None`` / ``"local"`` (the data folder), ``"hf"`` (the
  task's default Hub dataset), ``"hf:<path>[:<config>]"``, or a file path in the local format.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedsea.errors import InvalidInputError
from fedsea.tasks.data import Row, Rows, TaskDataError, load_hf_rows

KINDS = ("classify", "generate")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


@dataclass(frozen=True)
class Example:
    """One model-ready item of a task.

    Attributes:
        id: stable within the task and split (from the data's own ids where it has them).
        prompt: the user message (the chat template is applied later, per tokenizer).
        choices: candidate answers, scored by log-likelihood (``classify`` tasks).
        label: index of the gold answer in ``choices``; ``None`` when unknown.
        references: acceptable answers (``generate`` tasks; ReCoRD's gold entities too).
        group: examples scored together (MultiRC: the answer options of one question).
    """

    id: str
    prompt: str
    choices: tuple[str, ...] = ()
    label: int | None = None
    references: tuple[str, ...] = ()
    group: str | None = None

    @property
    def target(self) -> str:
        """The answer a model is trained to give: the gold choice, else the first reference."""
        if self.choices and self.label is not None:
            return self.choices[self.label]
        if self.references:
            return self.references[0]
        raise InvalidInputError("example", f"{self.id} has no gold answer to train on")


# Metrics take the examples and one prediction each: a choice index (classify) or text (generate).
Scorer = Callable[[Sequence[Example], Sequence[int] | Sequence[str]], dict[str, float]]
LocalLoader = Callable[[str, str | os.PathLike[str] | None], Rows]
FileLoader = Callable[[Path, str], Rows]


@dataclass(frozen=True)
class HubSource:
    """A task's default Hugging Face dataset.

    Attributes:
        path: Hub id (``aps/super_glue``); config: its configuration (``boolq``), if any.
        splits: fedsea split name -> the dataset's own split name.
        normalize: one Hub row -> zero or more canonical rows.
    """

    path: str
    config: str | None
    normalize: Callable[[Row], Iterable[Row]]
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "validation": "validation"})


@dataclass(frozen=True)
class Task:
    """A registered task (see ``fedsea.tasks.get_task``).

    Attributes:
        name: registry name; kind: ``"classify"`` or ``"generate"``.
        description: one line for ``list_tasks``.
        to_example: canonical row -> ``Example``.
        scorer: (examples, predictions) -> metrics, each in [0, 1].
        primary_metric: the metric reported first.
        load_local: (split, data_dir) -> ``Rows`` from the local data folder.
        load_file: (path, split) -> ``Rows`` from a file the user names, in the local format.
        hub: the default Hugging Face dataset, if there is one.
        label_names: names of the labels (for partition tables); empty where labels vary per row.
        eval_split: the split evaluated by default.
        max_new_tokens: greedy decoding budget (``generate`` tasks).
        length_norm: score a choice by its mean token log-likelihood (for choices of varying
            length, COPA, ReCoRD) instead of the sum (fixed verbalizers).
    """

    name: str
    kind: str
    description: str
    to_example: Callable[[Row], Example]
    scorer: Scorer
    primary_metric: str
    load_local: LocalLoader
    load_file: FileLoader
    hub: HubSource | None = None
    label_names: tuple[str, ...] = ()
    eval_split: str = "validation"
    max_new_tokens: int = 32
    length_norm: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    def load(
        self,
        split: str | None = None,
        source: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> Rows:
        """The canonical rows of one split.

        Args:
            split: ``"train"``, ``"validation"`` or (where the data has one) ``"test"``;
                defaults to ``eval_split``.
            source: see the module docstring; ``None`` reads the local data folder.
            data_dir: the local data folder (else ``$FEDSEA_DATA`` or ``../shared/datasets``).
        """
        split = split or self.eval_split
        if source in (None, "local"):
            return self.load_local(split, data_dir)
        assert source is not None
        if Path(source).expanduser().is_file():
            return self.load_file(Path(source).expanduser(), split)
        if source == "hf" or source.startswith("hf:") or _HUB_ID.match(source):
            return self._load_hub(source, split)
        raise TaskDataError(
            f"{self.name}: source {source!r} is not a file, nor 'local', 'hf', 'hf:<path>[:<config>]' or a Hub id"
        )

    def _load_hub(self, source: str, split: str) -> Rows:
        if self.hub is None:
            raise TaskDataError(f"{self.name} has no Hugging Face dataset; use its local file")
        path, config = self.hub.path, self.hub.config
        if source != "hf":
            spec = source.removeprefix("hf:")
            path, _, cfg = spec.partition(":")
            config = cfg or (self.hub.config if path == self.hub.path else None)
        return load_hf_rows(path, config, self.hub.splits.get(split, split), self.hub.normalize)

    def examples(
        self,
        split: str | None = None,
        source: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        limit: int | None = None,
    ) -> tuple[list[Example], Rows]:
        """The first ``limit`` examples of a split (whole groups: a MultiRC question is never cut),
        with the ``Rows`` they came from (for its source and notes)."""
        rows = self.load(split, source, data_dir)
        return take(self.name, [self.to_example(r) for r in rows.rows], limit), rows


def take(name: str, examples: list[Example], limit: int | None) -> list[Example]:
    """The first ``limit`` examples, extended to the end of the last one's group."""
    if limit is None:
        return examples
    if limit < 1:
        raise InvalidInputError("limit", f"must be >= 1, got {limit}")
    end = min(limit, len(examples))
    while end < len(examples) and examples[end].group is not None and examples[end].group == examples[end - 1].group:
        end += 1
    if not examples:
        raise TaskDataError(f"{name}: the split has no examples")
    return examples[:end]
