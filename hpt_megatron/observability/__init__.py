"""Logging, metric sinks, stage timing with NVTX ranges, profiler windows, FLOPs/MFU, plots."""
