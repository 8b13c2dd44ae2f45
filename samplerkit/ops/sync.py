"""When the hot path must not synchronise with the host.

On CUDA a ``bool(t.any())`` branch stalls the CPU until the GPU has caught up, and makes a
step impossible to capture in a CUDA graph. The built-in steps therefore have sync-free paths:
fixed-shape work selected on the device (``torch.where``), exact by construction rather than
by a checked fallback. They are taken

- inside :func:`sync_free_scope` (``BoundPipeline.sample_async`` and CUDA-graph capture enter
  it), on every device;
- on CUDA for eager steps too while :data:`EAGER_CUDA` is true (the default). Eager steps are
  launch-bound on a GPU and the sync-free paths launch more kernels, so this was measured, not
  assumed: they were faster than the checked paths on all six rows of
  ``benchmarks/bench_sampling.py --device cuda``, which times both (docs/performance.md);
- everywhere with ``SAMPLERKIT_SYNC_FREE=1`` (or :data:`FORCE`): the test suite runs them on
  the CPU that way and checks them against the same references.

On CPU a host check is free, so the faster checked paths stay there by default.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_ENV = os.environ.get("SAMPLERKIT_SYNC_FREE", "")

#: Run the sync-free paths on every device.
FORCE = _ENV == "1"

#: Eager CUDA steps take the sync-free paths too (``SAMPLERKIT_SYNC_FREE=0`` turns this off).
EAGER_CUDA = _ENV != "0"

_scope = threading.local()


@contextmanager
def sync_free_scope() -> Iterator[None]:
    """Inside, :func:`sync_free` is true on every device (for this thread)."""
    outer = getattr(_scope, "active", False)
    _scope.active = True
    try:
        yield
    finally:
        _scope.active = outer


def sync_free(device: torch.device | torch.Tensor) -> bool:
    """True when code running on ``device`` must not synchronise with the host."""
    if FORCE or getattr(_scope, "active", False):
        return True
    if isinstance(device, torch.Tensor):
        device = device.device
    return EAGER_CUDA and torch.device(device).type == "cuda"
