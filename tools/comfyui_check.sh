#!/usr/bin/env bash
# CI step: the real-ComfyUI tests (tests/comfyui/test_real_comfyui.py) in their own environment.
# 1. ComfyUI's CPU test environment from ../shared/comfyui/make-test-env.sh (kept in .venv-comfyui between runs:
#    a second run only checks it), with the newest diffusers / transformers / huggingface_hub / tokenizers, as
#    another custom node would have installed them;
# 2. this checkout installed into it as a ComfyUI user installs a custom node (`pip install -e .`), failing if that
#    changes any of those four (the pip output is kept in .venv-comfyui/ruyi-install.log);
# 3. the tests, which start ComfyUI on 127.0.0.1 with this checkout in custom_nodes/, and the preprocessing goldens
#    (tests/runtime/test_conditioning.py): ComfyUI's environment has torchvision, which changes what transformers'
#    image processors do.
set -euo pipefail
cd "$(dirname "$0")/.."
shared="$(cd "${RUYI_SHARED:-../shared}" && pwd)"
venv="${RUYI_COMFYUI_VENV:-.venv-comfyui}"
bash "$shared/comfyui/make-test-env.sh" "$venv"
echo "ComfyUI environment: ${SECONDS} s"
py="$venv/bin/python"
"$py" -m pip install -q -U diffusers transformers huggingface_hub tokenizers "pytest>=8"
versions() { "$py" -m pip list --format=freeze 2>/dev/null | grep -i -E '^(diffusers|transformers|huggingface[-_]hub|tokenizers)=='; }
before=$(versions)
"$py" -m pip install -e . > "$venv/ruyi-install.log" 2>&1 || { cat "$venv/ruyi-install.log"; exit 1; }
after=$(versions)
grep -E "^(Requirement already satisfied: (diffusers|transformers|huggingface[-_]hub|tokenizers)[<>=!~ ]|Successfully installed|  Attempting uninstall)" \
  "$venv/ruyi-install.log" || true
if [ "$before" != "$after" ]; then
  echo "installing ruyi-trt changed the shared environment:"; diff <(echo "$before") <(echo "$after") || true; exit 1
fi
echo "installing ruyi-trt left these as they were:" $after "(${SECONDS} s so far)"
RUYI_COMFYUI_TEST=1 RUYI_COMFYUI_SRC="$shared/comfyui/src" "$py" -m pytest -q tests/comfyui/test_real_comfyui.py \
  tests/runtime/test_conditioning.py "$@"
