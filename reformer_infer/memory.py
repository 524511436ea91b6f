"""Process-level memory tuning for serving long contexts (opt-in: the server and benchmarks call it).

A 64K prefill allocates and frees many tens-of-MB slices. glibc raises its mmap threshold dynamically up
to 32 MiB after such frees, so later slices come from the heap, fragment it, and are never returned:
resident memory ratchets up across layers (measured at 16K on the enwik8 shape: peak RSS 2.24 GiB with
glibc's defaults, 2.00 GiB with fixed 1 MiB thresholds). A fixed threshold keeps large buffers on mmap,
so freeing them returns the memory at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def release_large_buffers_promptly(threshold_bytes: int = 1 << 20) -> bool:
    """Fix glibc's mmap and trim thresholds (no-op returning False elsewhere, e.g. musl or macOS)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold_bytes))
    logger.debug("mallopt mmap/trim thresholds %d bytes: %s", threshold_bytes, ok)
    return ok
