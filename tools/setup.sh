#!/usr/bin/env bash
# Set up ruyi-trt in ./.venv on a fresh machine: CPU torch pinned (an unpinned torch pulls multi-GB
# CUDA wheels), the package in editable mode with its test extras. Idempotent; safe to re-run.
# On a CUDA machine set RUYI_TORCH to the torch requirement you want, e.g. RUYI_TORCH="torch==2.11.0".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${RUYI_TORCH:-torch==2.13.0}" -e ".[dev]"
.venv/bin/python - <<'PY'
import importlib.metadata as md, sys
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
print(f"set up .venv: python {sys.version.split()[0]}, torch {v('torch')}, ruyi-trt {v('ruyi-trt')} (editable, extras dev), "
      f"onnxruntime-gpu {v('onnxruntime-gpu')}, diffusers {v('diffusers')}, transformers {v('transformers')}")
PY
