"""The extraction job's allocator setting: freed memory stays in the process."""

import json
import statistics
import subprocess
import sys

import pytest

CHURN = """
import json, resource, torch
from pipeline.memory import retain_freed_memory

def faults_per_batch(passes: int = 9) -> list[int]:
    counts = []
    for _ in range(passes):
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 * 2**20).sum()  # 64 MB, freed again: a batch's activations
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    return counts

before = faults_per_batch()
retained = retain_freed_memory()
faults_per_batch(2)  # the heap grows once
print(json.dumps({"before": before, "retained": retained, "after": faults_per_batch()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_not_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, check=True)
    faults = json.loads(out.stdout)
    assert faults["retained"]
    # Medians, as a stray pass is the machine's doing; ratios, as transparent huge pages (where a
    # machine has them always on) fault 2 MiB at a time: 544 faults a pass here, not 16,384.
    before, after = statistics.median(faults["before"]), statistics.median(faults["after"])
    assert before > 100, faults  # a process without the setting faults its 64 MB in on every pass
    assert after < before / 100, faults
