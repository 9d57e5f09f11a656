"""Data: HPT-schema datasets, schema checks, prompt templates, the sampler, the synthetic task."""
