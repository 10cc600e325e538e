"""GPU tests: marked ``gpu``, selected only by ``make gpu-check`` (``pytest -m gpu``).

``make test`` deselects them (``-m "not gpu"``), so a CPU run never counts them, not even as
skipped. Without CUDA they are skipped with a reason, unless ``FEDSEA_REQUIRE_GPU=1`` (set by
``scripts/gpu_check.sh``): then a missing GPU fails the run instead of passing it vacuously.
``FEDSEA_GPU_TEST_DEVICE=cpu`` runs them on the CPU instead: a dry run of their code, no GPU check.
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _cuda() -> None:
    if torch.cuda.is_available() or os.environ.get("FEDSEA_GPU_TEST_DEVICE", "cuda") == "cpu":
        return
    if os.environ.get("FEDSEA_REQUIRE_GPU") == "1":
        pytest.fail(f"FEDSEA_REQUIRE_GPU=1 but torch {torch.__version__} sees no CUDA device")
    pytest.skip("needs a CUDA GPU (run with make gpu-check)")
