"""glibc's allocator, set so that large responses do not fault in fresh pages every time.

Encoding a page of a paginated LIST (500 keys of 1 KiB: 534 kB) makes protobuf's upb grow its
output buffer through blocks of doubling size, about 2 MB in all, freed as soon as gRPC has
the bytes. With glibc's default thresholds those blocks are mapped for each response (above
the mmap threshold) or taken from a heap top that free() gives back to the system each time
(past the trim threshold, by default twice the mmap threshold), so every response writes into
pages fresh from the kernel: 200 to 500 page faults per page. py-spy --native put a tenth of a
front-end's main thread there (upb's buffer growth, sbrk) during paginated LISTs on MariaDB,
and a LIST of 10 000 keys took 180-230 ms instead of 120-170 ms.

Set here: a block below MMAP_THRESHOLD comes from the heap, and the heap keeps up to
TRIM_THRESHOLD of free memory at its top for the next request, so those pages stay mapped. A
block above MMAP_THRESHOLD (a response of many megabytes) is still mapped for itself alone and
unmapped when freed, and the free memory kept at the heap's top stays under TRIM_THRESHOLD
(peak RSS in `make bench` did not move: 248/224/220 MiB on SQLite/PostgreSQL/MariaDB).

An operator's own setting wins: nothing is changed when the environment sets either threshold
(GLIBC_TUNABLES or the MALLOC_*_THRESHOLD_ variables). Without glibc (musl, macOS) nothing is
changed either.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 16 << 20

# mallopt's parameter numbers, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_OPERATOR_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_OPERATOR_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold")


def operator_tuned(environ: Mapping[str, str]) -> bool:
    """Whether the environment already sets glibc's mmap or trim threshold."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(name in environ for name in _OPERATOR_SETTINGS) or any(
        name in tunables for name in _OPERATOR_TUNABLES
    )


def keep_freed_memory(environ: Mapping[str, str]) -> bool:
    """Set this process's mmap and trim thresholds (see the module's docstring); whether they
    were set."""
    if operator_tuned(environ):
        log.debug("malloc thresholds left as the environment sets them")
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
