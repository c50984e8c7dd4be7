"""Giving freed memory back to the system between a run's phases.

A run frees gigabytes at a time (the input's protobuf after the passes, each onnxruntime
session after verifying), but glibc keeps freed pages of its heap mapped for reuse: after the
1.1 B-parameter decoder's passes, 3.3 GB stayed resident with nothing in it, and the next
onnxruntime session peaked on top of it. malloc_trim hands those pages back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


def release_freed_memory() -> None:
    """Collect garbage and return the C heap's free pages to the system (glibc only; elsewhere
    the collection alone)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None
