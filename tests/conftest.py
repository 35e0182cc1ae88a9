"""Session-wide test setup: Triton's CPU interpreter on machines without a GPU.

Triton decides between its interpreter and its compiler when a function is decorated, its own library functions
(tl.zeros, tl.philox, ...) included, and those are decorated when `triton` is first imported. Several modules import
triton while tests are being collected (torchao does, and tests/test_philox_triton.py), so TRITON_INTERPRET=1 has to
be set here, before any test module is collected. Without a GPU no compiled Triton kernel can run anyway; with one,
the variable is left alone and the Triton tests run the compiled kernels on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.threads import one_torch_thread

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (modules opt in with pytest.mark.usefixtures("one_thread"))."""
    with one_torch_thread():
        yield
