#!/usr/bin/env bash
# Create .venv/ at the repo root and install the toolkit with its pinned dependencies.
# Idempotent: re-running is a no-op unless pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import analysis, lmms_eval, deepspeed" 2>/dev/null; then
    echo "setup: .venv is up to date"
    exit 0
fi

echo "setup: installing pinned dependencies into .venv (first time: a few minutes, ~7 GB)"
.venv/bin/python -m pip install -q --upgrade "pip==25.3"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
# DeepSpeed (the `scale` extra: multi-GPU training, docs/training_scale.md) ships only an sdist whose setup.py
# imports torch, so it is built against the torch installed above (--no-build-isolation), after it. DS_BUILD_OPS=0:
# no CUDA ops compiled here (a pure-Python install that works on this CPU machine); DeepSpeed JIT-builds them on
# the GPU machine that first needs them.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -c constraints.txt --no-build-isolation deepspeed
.venv/bin/python -c "import analysis, lmms_eval, hydra, fvcore, torch, transformers, deepspeed; print('setup: ok, torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$want" > "$stamp"
