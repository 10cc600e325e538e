"""Issue 16: ``fedsea --help`` and every ``fedsea <command> --help`` start in a fraction of a second.

They used to take 5-7 s, importing torch, transformers, gRPC and Flower to print a page of text.
The parser is now built from modules that import none of them (the ``constants`` modules, the
settings dataclasses), ``fedsea`` and its subpackages re-export their names lazily (PEP 562), and
each command imports its heavy modules when it runs.

Wall time on a shared CI machine is noisy, so the structural fact is what these tests pin down:
in a fresh interpreter, after ``--help`` of every command, ``sys.modules`` holds none of the
heavy libraries. The timing check is generous (3 s, against ~0.15 s measured on a 2-core
machine and 5-7 s before).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import fedsea
from fedsea.cli.main import build_parser

HEAVY = ("torch", "transformers", "flwr", "grpc", "ray")
SRC = Path(fedsea.__file__).resolve().parents[1]  # this checkout's src, for the subprocesses
# ``fedsea.__all__`` at c3b4514, when ``import fedsea`` still imported every layer.
EXPORTED_BEFORE = {
    "DEFAULT_MODEL",
    "AdapterError",
    "Batch",
    "CentralTrainer",
    "ClientTls",
    "CutTraffic",
    "FedseaError",
    "GenerationConfig",
    "GenerationOutput",
    "Head",
    "InvalidInputError",
    "LocalTrunk",
    "LoraSpec",
    "ModelLoadError",
    "ModelNotFoundError",
    "NoiseConfig",
    "OptimConfig",
    "PartitionError",
    "Placement",
    "Privatizer",
    "ServerLimits",
    "SplitClient",
    "SplitConfig",
    "SplitLora",
    "SplitModel",
    "SplitTrainer",
    "Tail",
    "Trunk",
    "UnsupportedModelError",
    "WireConfig",
    "__version__",
    "cache_dir",
    "central_forward",
    "load_model",
    "load_tokenizer",
    "make_batch",
    "merged_model",
    "privatize",
    "split_greedy_generate",
    "split_model",
    "tiny_llama",
    "tiny_tokenizer",
}
# What a fresh interpreter imports after each command line: none of HEAVY may show up.
PROBE = """
import contextlib, io, json, sys
from fedsea.cli.main import main
heavy = {heavy!r}
loaded = {{}}
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
    loaded[" ".join(argv)] = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
print(json.dumps(loaded))
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _python(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=_env(), timeout=timeout, check=False
    )


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command and subcommand of the parser: (), ("demo",), ..., ("token", "add"), ..."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _command_paths(child, (*prefix, name))


def test_help_of_every_command_imports_no_heavy_library() -> None:
    paths = list(_command_paths(build_parser()))
    assert len(paths) > 20  # every command, with bench's, token's, config's and flower's subcommands
    # `fedsea config example` runs: the run file's schema (RunConfig, its defaults) needs no torch either.
    argvs = [["--version"], ["config", "example"]] + [[*path, "--help"] for path in paths]
    done = _python("-c", PROBE.format(heavy=HEAVY), json.dumps(argvs))
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert set(loaded) == {" ".join(argv) for argv in argvs}
    bad = {argv: modules[:5] for argv, modules in loaded.items() if modules}
    assert not bad, f"--help must not import {', '.join(HEAVY)}: {bad}"


def test_import_fedsea_alone_imports_no_heavy_library() -> None:
    code = "import sys, fedsea; print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))"
    done = _python("-c", code, *HEAVY)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["simulate", "--help"], ["serve", "--help"], ["generate", "--help"]],
    ids=lambda argv: " ".join(argv),
)
def test_help_is_fast(argv: list[str]) -> None:
    """Measured ~0.15 s each on a 2-core machine (5-7 s before); 3 s leaves room for a loaded CI box."""
    start = time.perf_counter()
    done = _python("-m", "fedsea.cli", *argv)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert "fedsea" in done.stdout
    assert seconds < 3.0, f"fedsea {' '.join(argv)} took {seconds:.2f} s"


@pytest.mark.parametrize("package", ["fedsea", "fedsea.client", "fedsea.privacy", "fedsea.training"])
def test_every_lazy_export_resolves(package: str) -> None:
    """``from <package> import X`` works for every X in ``__all__``, and ``dir`` lists them."""
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
        exec(f"from {package} import {name}", {})
    assert set(module.__all__) <= set(dir(module))
    with pytest.raises(AttributeError, match="no attribute"):
        module.no_such_name  # noqa: B018


def test_fedsea_exports_what_it_did() -> None:
    """The names ``fedsea`` exported before its imports became lazy, each the object of its home module."""
    from fedsea.model.load import load_model
    from fedsea.model.split import split_model
    from fedsea.training.generation import GenerationConfig

    assert fedsea.load_model is load_model and fedsea.split_model is split_model
    assert fedsea.GenerationConfig is GenerationConfig
    assert set(fedsea.__all__) == EXPORTED_BEFORE


def test_light_constants_agree_with_their_heavy_homes() -> None:
    """The names the parser reads from the torch-free modules are the ones the code runs with."""
    from fedsea.config import WIRE_COMPRESSIONS
    from fedsea.experiments import attack_grid, constants
    from fedsea.federation.constants import STRATEGY_NAMES
    from fedsea.federation.strategy import STRATEGIES
    from fedsea.model import load
    from fedsea.model.constants import DEFAULT_MODEL
    from fedsea.privacy import regularizers
    from fedsea.privacy.accountant import CONVERSIONS
    from fedsea.privacy.calibration import NoiseTarget
    from fedsea.privacy.constants import DEFAULT_DELTA, HEAD_REGULARIZERS
    from fedsea.wire.compress import COMPRESSIONS

    assert tuple(STRATEGIES) == STRATEGY_NAMES
    assert set(COMPRESSIONS) <= set(WIRE_COMPRESSIONS)
    assert load.DEFAULT_MODEL == DEFAULT_MODEL and regularizers.HEAD_REGULARIZERS is HEAD_REGULARIZERS
    assert NoiseTarget(sigma=0.0).delta == DEFAULT_DELTA and NoiseTarget(sigma=0.0).conversion == CONVERSIONS[0]
    assert attack_grid.DEFENCES is constants.DEFENCES and attack_grid.ATTACKS is constants.ATTACKS
