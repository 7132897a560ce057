"""What a reconstruction must beat: the nearest training image by feature distance.

The other baselines are models: the trained model with its condition dropped (`Reconstructor`,
`condition=False`) and the up-convolutional decoder trained on the same cache (`mode: updecoder`).
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from storage_specs.datasets import PairDataset
from training.models import FeatureNorm


def normalized(features: torch.Tensor, stats: dict) -> torch.Tensor:
    """Flattened maps in the channel-normalised space the models see (the trainer's rule)."""
    norm = FeatureNorm(len(stats["mean"]))
    norm.set_stats(stats["mean"], stats["std"])
    return norm.normalize(features).flatten(1)


def nearest_items(
    queries: torch.Tensor, pool: PairDataset, stats: dict, batch_size: int = 256,
    progress: bool = False, query_rows: list[int] | None = None,
) -> list[int]:  # fmt: skip
    """The item of `pool` (training pairs, `features` array) nearest to each query map in
    normalised L2, streaming the pool in batches: memory holds the queries and one batch.
    Never a view of the query's own sample (`query_rows`): with a split that evaluates training
    samples, the image itself would be its nearest neighbour."""
    q = normalized(queries, stats)
    own = torch.as_tensor(query_rows if query_rows is not None else [-1] * len(q))
    best = torch.full((len(q),), float("inf"))
    index = torch.zeros(len(q), dtype=torch.long)
    starts = range(0, len(pool), batch_size)
    for start in tqdm(starts, desc="nearest training pair", disable=not progress, unit="batch"):
        ids = list(range(start, min(start + batch_size, len(pool))))
        candidates = normalized(pool.read_batch(ids)["features"], stats)
        rows = torch.as_tensor([pool.item(i)[0] for i in ids])
        distances = torch.cdist(q, candidates).masked_fill(own[:, None] == rows, float("inf"))
        distance, which = distances.min(dim=1)
        closer = distance < best
        best[closer], index[closer] = distance[closer], torch.as_tensor(ids)[which[closer]]
    return index.tolist()
