"""torch on a chosen number of threads for a block of test code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch (and the native twins, which split their work the same way) on `count` threads; the previous thread
    count comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_torch_thread() -> contextlib.AbstractContextManager[None]:
    """Deterministic sums, and no second torch thread spinning against the other jobs of a 2-core CI runner."""
    return torch_threads(1)
