#!/usr/bin/env bash
# fedsea's GPU check (`make gpu-check`), under 8 minutes on one NVIDIA GPU:
#   1. the CUDA tests (tests/gpu, marker `gpu`): random weights equal on CPU and CUDA bit for bit,
#      float32 split == Hugging Face to 1e-4 of scale, bfloat16 split as close to float32 as HF's
#      own bfloat16 run (within 2x + 1e-3 of scale), a CUDA server training a CPU client;
#   2. fedsea bench train    --model random:llama-2-7b --device cuda --dtype bfloat16 --batch 4 --tokens 512 --head-layers 2 --tail-layers 2 --micro-batches 1 2
#   3. fedsea bench generate --model random:llama-2-7b --device cuda --dtype bfloat16 --prompt-tokens 512 --new-tokens 64 --batches 1 8 --rounds 2
# and prints the two benchmarks' JSON lines. Every step runs even after one fails; the check fails at the end.
#
# Usage:
#   scripts/gpu_check.sh [run]          the check, with $PYTHON (default .venv-gpu/bin/python)
#   scripts/gpu_check.sh --dry-run      the same steps on the CPU at toy sizes (random:llama-tiny): checks the plumbing anywhere
#   scripts/gpu_check.sh setup          make .venv-gpu (see below); `make gpu-check` runs setup, then run
#   scripts/gpu_check.sh wheelhouse DIR [--no-torch]
#                                       download the wheels setup needs into DIR, for a GPU machine that is offline
#
# setup: without GPU_PYTHON, a fresh venv from $BOOTSTRAP_PYTHON (default python3) gets torch==2.13.0
# from the default PyPI index (on Linux x86-64 that is the CUDA build; the CPU venv of `make test`
# pins the CPU build instead), then fedsea's dependencies. With GPU_PYTHON=/path/to/python (an
# interpreter that already holds a CUDA torch, as GPU images do), the venv is made with
# --system-site-packages from it and its torch is used as it is; only what it lacks is installed.
# With GPU_WHEELHOUSE=DIR, pip installs from DIR only (--no-index): nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-gpu
TORCH_PIN="torch==2.13.0"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# fedsea's dependencies and the test tools, from pyproject.toml. Left out: torch (it comes first,
# or from GPU_PYTHON), and datasets and rouge-score, which the check never imports (task data and
# summarization metrics; rouge-score has no wheel, so a wheelhouse could not hold it).
requirements() {
    "$1" - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
dev = [d for d in project["optional-dependencies"]["dev"] if re.match(r"(pytest|hypothesis)\b", d)]
skip = re.compile(r"(torch|datasets|rouge-score)\b")
print("\n".join(d for d in project["dependencies"] + dev if not skip.match(d)))
EOF
}

setup() {
    local source=()
    if [[ -n "${GPU_WHEELHOUSE:-}" ]]; then source=(--no-index --find-links "$GPU_WHEELHOUSE"); fi
    rm -rf "$VENV"
    if [[ -n "${GPU_PYTHON:-}" ]]; then
        # Not a venv: GPU images keep torch in a venv of their own, which a --system-site-packages
        # venv would not see. fedsea's direct dependencies go into $VENV/site, put first on the
        # path by the wrapper $VENV/bin/python (its own packages, torch included, serve the rest).
        mkdir -p "$VENV/bin"
        requirements "$GPU_PYTHON" >"$VENV/requirements.txt"
        "$GPU_PYTHON" -m pip install -q --no-deps --no-compile --target "$VENV/site" "${source[@]}" -r "$VENV/requirements.txt"
        printf '#!/bin/sh\nexport PYTHONPATH="%s/site${PYTHONPATH:+:$PYTHONPATH}"\nexec "%s" "$@"\n' \
            "$PWD/$VENV" "$(command -v "$GPU_PYTHON")" >"$VENV/bin/python"
        chmod +x "$VENV/bin/python"
    else
        "${BOOTSTRAP_PYTHON:-python3}" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -q "${source[@]}" "$TORCH_PIN"
        requirements "$VENV/bin/python" >"$VENV/requirements.txt"
        "$VENV/bin/python" -m pip install -q "${source[@]}" -r "$VENV/requirements.txt"
    fi
    # fedsea itself runs from src/ (PYTHONPATH in run): no build backend needed offline.
    "$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
}

wheelhouse() {
    local dir=$1 no_torch=${2:-}
    local platform=(--only-binary=:all: --implementation cp --python-version "${WHEEL_PYTHON_VERSION:-3.12}")
    for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
        platform+=(--platform "$tag")
    done
    requirements python3 >"$dir.requirements.txt"
    if [[ "$no_torch" == "--no-torch" ]]; then
        # For an interpreter that has a CUDA torch and most packages already: fedsea's direct
        # dependencies only (torch's own are not wanted). Add any missing one pip then names.
        python3 -m pip download -q --no-deps "${platform[@]}" -d "$dir" -r "$dir.requirements.txt"
    else
        python3 -m pip download -q "${platform[@]}" -d "$dir" "$TORCH_PIN" -r "$dir.requirements.txt"
    fi
    du -sh "$dir"
}

run() {
    local python=${PYTHON:-$VENV/bin/python} dry=${1:-}
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    local model=random:llama-2-7b device=cuda
    # Micro-batches 1 and 2: the step whole, then pipelined (the server starts the first half
    # while the second is in flight).
    local train=(--batch 4 --tokens 512 --head-layers 2 --tail-layers 2 --micro-batches 1 2)
    local generate=(--prompt-tokens 512 --new-tokens 64 --batches 1 8 --rounds 2)
    if [[ "$dry" == "--dry-run" ]]; then
        model="random:llama-tiny?layers=4" device=cpu
        train=(--batch 2 --tokens 16 --head-layers 1 --tail-layers 1 --steps 2 --warmup 1 --micro-batches 1 2)
        generate=(--prompt-tokens 16 --new-tokens 4 --batches 1 2 --naive-tokens 2 --head-layers 1 --tail-layers 1 --net-latency-ms 1)
        export FEDSEA_GPU_TEST_DEVICE=cpu FEDSEA_GPU_TEST_SHAPE=random:llama-tiny
    else
        export FEDSEA_REQUIRE_GPU=1  # a missing GPU fails the tests instead of skipping them
        "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch ' + torch.__version__ + ' sees no CUDA GPU')"
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    fi
    "$python" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
    # Every step runs even when one before it failed (a GPU is often lent for minutes only: one
    # run must report everything); the check fails at the end, naming the steps that failed.
    local failed=()
    step "1/3 CUDA tests" 180 "$python" -m pytest -q -m gpu tests/gpu || failed+=("CUDA tests")
    step "2/3 bench train" 150 "$python" -m fedsea.cli bench train --model "$model" --device "$device" \
        --dtype bfloat16 "${train[@]}" || failed+=("bench train")
    step "3/3 bench generate" 150 "$python" -m fedsea.cli bench generate --model "$model" --device "$device" \
        --dtype bfloat16 "${generate[@]}" || failed+=("bench generate")
    if ((${#failed[@]})); then
        echo "gpu check FAILED: ${failed[*]}" >&2
        return 1
    fi
    echo "gpu check passed"
}

# step NAME SECONDS CMD...: run CMD under a time limit, printing its name, command and duration.
step() {
    local name=$1 limit=$2 start=$SECONDS rc=0
    shift 2
    echo "== $name: ${*:2}"
    timeout "$limit" "$@" || rc=$?
    local over=""
    if ((rc == 124)); then over=" (over its $limit s limit)"; fi
    echo "== $name: exit $rc after $((SECONDS - start)) s$over"
    return "$rc"
}

case "${1:-run}" in
    setup) setup ;;
    run) run ;;
    --dry-run) run --dry-run ;;
    wheelhouse) wheelhouse "${2:?usage: scripts/gpu_check.sh wheelhouse DIR [--no-torch]}" "${3:-}" ;;
    *) echo "usage: scripts/gpu_check.sh [run | --dry-run | setup | wheelhouse DIR [--no-torch]]" >&2; exit 2 ;;
esac
