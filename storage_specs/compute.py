"""Where per-shard work runs: on a dask.distributed cluster, or on this process's threads.

Statistics, validation and export split a store into tasks that each name the store by URL and
open what they read themselves, so the same task runs on a remote worker (a `SLURMCluster` job, a
machine reading S3 with its own credentials) as well as here: no open array or filesystem object,
and so no credential, is ever shipped.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import zarr
from dask.system import CPU_COUNT  # this job's CPUs (affinity, cgroup limits), as dask counts
from tqdm import tqdm

if TYPE_CHECKING:
    from distributed import Client

LOCAL = "local"  # the `--dask-scheduler` value that starts a LocalCluster on this machine


class SchedulerError(ValueError):
    """No dask scheduler answers at the address given: the user's to fix, one line."""


@contextlib.contextmanager
def dask_client(address: str = LOCAL, timeout: float = 5.0) -> Iterator[Client]:
    """A `distributed.Client`, closed (with any cluster it started) on exit.

    `address`: `tcp://host:port`, a scheduler file (`dask scheduler --scheduler-file`,
    dask-jobqueue), or LOCAL: a LocalCluster of one single-threaded process per CPU.
    """
    from distributed import Client, LocalCluster

    if address == LOCAL:
        with (
            LocalCluster(
                n_workers=CPU_COUNT, threads_per_worker=1, processes=True,
                dashboard_address=":0",  # any free port: no clash, no warning
            ) as cluster,
            Client(cluster) as client,
        ):  # fmt: skip
            yield client
        return
    where = {"scheduler_file": address} if Path(address).is_file() else {"address": address}
    try:
        client = Client(**where, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:  # refused, timed out, not an address
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SchedulerError(f"no dask scheduler at {address} ({reason})") from None
    with client:
        yield client


def run_tasks(
    fn: Callable,
    calls: Sequence[tuple],
    client: Client | None = None,
    desc: str = "",
    progress: bool = False,
) -> list:
    """`fn(*call)` for every call, results in the order of `calls` whatever order they finish in:
    one task each on `client`'s cluster, else on a thread pool here (as dask's default would)."""
    with contextlib.ExitStack() as stack:
        if client is None:
            pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(CPU_COUNT))
            futures = [pool.submit(fn, *call) for call in calls]
            finished = concurrent.futures.as_completed(futures)
        else:
            from distributed import as_completed

            futures = [client.submit(fn, *call, pure=False) for call in calls]
            finished = as_completed(futures)
        for _ in tqdm(finished, total=len(futures), desc=desc, disable=not progress):
            pass
        return [future.result() for future in futures]


def open_array(url: str, path: str) -> zarr.Array:
    """One array of a store, opened from its URL where the task runs (one metadata read)."""
    return zarr.open_array(url, path=path, mode="r", zarr_format=3)
