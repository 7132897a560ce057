"""Sampling from trained models (any diffusers scheduler, classifier-free guidance) and the
re-extraction of features that evaluation measures against; both read the same stores."""
