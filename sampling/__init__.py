"""Sampler and evaluation (roadmap: reads the same feature stores as the trainer)."""
