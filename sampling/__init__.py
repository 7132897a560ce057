"""What trained models make of stored feature maps, and how faithful it is.

`sample` (images of held-out maps by a model and its baselines, into a samples store), `evaluate`
(re-extraction with the store's recorded backbone, metrics), `analyses` (concept steering,
composite features) and `report` (one HTML page), over `reconstruct` (a trained folder as an image
maker) and `sampler` (any diffusers scheduler, classifier-free guidance).
"""
