"""Process-level memory and garbage-collector tuning for serving (opt-in: the server and benchmarks call it).

A 64K prefill allocates and frees many tens-of-MB slices. glibc raises its mmap threshold dynamically up
to 32 MiB after such frees, so later slices come from the heap, fragment it, and are never returned:
resident memory ratchets up across layers. A fixed threshold keeps large buffers on mmap, so freeing them
returns the memory at once; but every mmapped buffer is fresh pages, faulted in on first touch, so a
threshold too low makes every mid-sized temporary pay that. Measured (one thread, 2026-11-23):

| threshold | enwik8 shape, 16K prefill | small preset engine, 64K prefill beside 4 streams |
|---|---|---|
| glibc default (dynamic) | 50.9 s, peak RSS 1.94 GiB | 7.0-7.3 s |
| fixed 1 MiB (the earlier choice) | 65.0 s, 1.66 GiB | 9.3-9.7 s |
| fixed 16 MiB (the default here) | 61.8 s, 1.68 GiB | 7.0-7.1 s |

16 MiB keeps the RSS of 1 MiB and the small model's speed of glibc's default: its slices (4096 positions x
hidden 256 or FF 512) stay on the heap, the enwik8 shape's 16-64 MiB slices go to mmap. At 64K on the
enwik8 shape: 239.4 s and peak RSS 3.41 GiB with 16 MiB, 263.7 s and 3.37 GiB with 1 MiB; with the
trim threshold below at 256 MiB, 241.5 s and 3.51 GiB (3.76 GB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def release_large_buffers_promptly(threshold_bytes: int = 16 << 20, trim_bytes: int = 256 << 20) -> bool:
    """Fix glibc's mmap threshold, and its trim threshold: free memory at the top of the heap is given back
    to the OS only beyond `trim_bytes` (no-op returning False elsewhere, e.g. musl or macOS).

    The trim threshold matters on virtual machines, where faulting fresh pages back in can cost ~10 us a
    page: with it at 16 MiB, an LSH layer's first attention group re-faulted its ~12 MB of temporaries, one
    unit took 65-110 ms instead of ~30 and streams decoding beside a 64K prefill saw gaps of 3-6 steps
    (after the process had freed GBs); at 256 MiB, 2.1-2.4 steps in every run."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes))
    logger.debug("mallopt mmap threshold %d, trim threshold %d bytes: %s", threshold_bytes, trim_bytes, ok)
    return ok


def freeze_startup_objects() -> int:
    """Collect once, then move every object alive now out of the cyclic collector's reach (`gc.freeze`);
    returns how many were frozen. Call it when startup is done (model loaded, warmed up).

    Importing torch leaves ~170K tracked objects, and a full (generation 2) collection walks all of them:
    ~50 ms here, holding the GIL, at a moment set by allocation counts. In a serving process that pause
    lands inside an engine step (measured: a 4-stream decode step of 7 ms took 68 ms, and the largest
    inter-token gap of streams decoding beside a 64K prefill doubled). Startup objects live as long as the
    process, so the collector would never reclaim them anyway; what is allocated later is collected as
    usual. SGLang and Ray Serve do the same after warm-up.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("froze %d startup objects out of the cyclic GC", frozen)
    return frozen
