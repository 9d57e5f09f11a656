"""Checkpoint conversion scripts; the logic lives in ``hpt_megatron.convert.cli``."""
