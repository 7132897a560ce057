"""Decoupled trainer for the feature-conditioned diffusion model (roadmap: reads cached feature/latent pairs only)."""
