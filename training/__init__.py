"""The decoupled trainer: fit the feature-conditioned diffusion model from a store alone.

`train.train(config)` (the `featinv train` command and the Snakemake rule `train`) reads pairs of
a feature map and a target of the same view through `storage_specs` and never builds a backbone.
"""
