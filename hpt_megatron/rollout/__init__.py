"""Rollout engines behind one protocol: the HF engine (transformers, CPU/GPU) and the vLLM engine
(GPU, colocated). The trainer never knows which one it has."""

from hpt_megatron.rollout.base import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "RolloutEngine", "SamplingParams"]
