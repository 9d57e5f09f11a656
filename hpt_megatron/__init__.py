"""hpt_megatron: Hybrid Post-Training (HPT) and the Unified Policy Gradient Estimator on Megatron-Core."""

__version__ = "0.1.0"
