"""Held-out splits decided by the sample key alone.

A trainer must never see the samples its sampler and evaluation are later judged on, and that must
stay true when a store is re-made or grows: so membership depends only on the key (a hash), never on
row numbers, listing order or the size of the store.  SPEC.md states the rule, so another team can
recompute the same split without featinv.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

RULE = "sha256('featinv-split/<salt>/<key>')[:8] as little-endian uint64 / 2**64 < fraction"


def key_unit(key: str, salt: str = "0") -> float:
    """A stable number in [0, 1) for a sample key."""
    digest = hashlib.sha256(f"featinv-split/{salt}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def heldout_mask(keys: Iterable[str], fraction: float, salt: str = "0") -> np.ndarray:
    """True for the keys in the held-out part (about `fraction` of them)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    return np.fromiter((key_unit(str(k), salt) < fraction for k in keys), dtype=bool)
