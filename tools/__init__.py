"""Command-line tools (thin wrappers over the hpt_megatron package)."""
