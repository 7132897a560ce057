"""Decoupled trainer for the feature-conditioned diffusion model.

Roadmap: it reads cached feature/latent pairs only, never running a backbone.
"""
