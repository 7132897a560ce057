"""The featinv store specification (SPEC.md), its metadata schema, validator and reader.

This is the only thing the stages share: the pipeline writes through `layout`, the trainer and
sampler read through `reader`, and anyone else can read a store with plain zarr by following
SPEC.md.
"""

from storage_specs.layout import SPEC_VERSION, StoreError
from storage_specs.reader import FeatureStore, open_store
from storage_specs.validate import validate_store

__all__ = ["SPEC_VERSION", "FeatureStore", "StoreError", "open_store", "validate_store"]
