"""The command-line tools keep glibc's freed blocks for the next tensor (qcbguard/allocator.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A 40 MiB block written page by page, freed, ten times: the minor page faults each round costs, before and after
# keep_freed_memory(). 40 MiB lies beyond glibc's default mmap threshold (at most 32 MiB), so by default every round
# maps fresh pages and faults all of them in.
_PROBE = """
import resource
from qcbguard.allocator import keep_freed_memory

def faults_per_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        block = bytearray(40 << 20)
        block[:: 4096] = bytes(len(range(0, 40 << 20, 4096)))
        del block
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

default = faults_per_round()
changed = keep_freed_memory()
faults_per_round()  # the first round after the change grows the heap once
print(default, changed, faults_per_round())
"""


def test_freed_blocks_are_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout.split()
    default, changed, kept = float(out[0]), out[1] == "True", float(out[2])
    if not changed:
        pytest.skip("not glibc: mallopt is not there to tune")
    pages = (40 << 20) // 4096
    assert default > pages / 2, default  # glibc's default maps the block afresh every round
    assert kept < pages / 20, kept  # kept in the heap: no page is faulted in again
