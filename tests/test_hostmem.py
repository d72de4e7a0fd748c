"""facefuse.hostmem: freed image-sized buffers are reused instead of being page-faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

_COUNT_FAULTS = """
import resource, sys
import numpy as np
from facefuse.hostmem import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()

def batch():  # a batch of 1080p targets, a third of one, a larger one: freed in between, as a server does
    targets = np.ones(8 * 6_220_800, np.uint8)
    part = np.ones(len(targets) // 3, np.uint8)
    del targets
    larger = np.ones(16 * 6_220_800, np.uint8)
    del part, larger

batch()  # the first round may grow the heap
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", _COUNT_FAULTS, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_image_buffers_are_reused_without_page_faults():
    plain, kept = _faults("plain"), _faults("keep")
    # glibc's default: blocks above 32 MiB are fresh mappings, faulted in again each round; kept: reused.
    assert kept * 4 < plain, (kept, plain)
