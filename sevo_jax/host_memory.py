"""glibc malloc settings that stop XLA:CPU's per-step temporaries from page-faulting.

XLA:CPU allocates a step's large temporaries (BERT4Rec's ``(masked positions, items)`` logits:
46 MB on Beauty) with ``malloc`` on every call and frees them at its end. glibc serves such
blocks with fresh ``mmap`` pages (or, on its per-thread arenas, gives the pages back with
``madvise``), so every step touches them anew: ~32,000 minor page faults per BERT4Rec step on
Beauty, ~11,000 per STOSA step, a third of BERT4Rec's step time (BENCHMARKS.md "Host memory").

:func:`keep_freed_memory` tells glibc to serve every block from one heap (``M_ARENA_MAX = 1``,
``M_MMAP_MAX = 0``) and to keep up to ``TRIM_THRESHOLD`` bytes of freed memory at its top
(``M_TRIM_THRESHOLD``), so the next step reuses the pages it already touched. All three are
needed (any two leave the faults). The cost: the process keeps up to ``TRIM_THRESHOLD`` of freed
memory instead of returning it to the system. ``sevo-train`` and ``examples/reproduce_paper.py``
call it first thing; a program of your own calls it before its first JAX computation (threads
that already exist keep their arenas).
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["TRIM_THRESHOLD", "USER_SETTINGS", "keep_freed_memory"]

TRIM_THRESHOLD = 1 << 30  # bytes of freed memory the heap keeps at its top
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# the user's own malloc settings, which win
USER_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                 "GLIBC_TUNABLES")


def keep_freed_memory(environ: dict | None = None) -> bool:
    """Apply the settings above to this process's glibc ``malloc``; True if they were applied.

    Does nothing (returns False) off Linux, without glibc, when ``SEVO_JAX_KEEP_MALLOC=1`` or
    when the environment already holds malloc settings (``USER_SETTINGS``) of its own.

    Examples:
      >>> keep_freed_memory({"SEVO_JAX_KEEP_MALLOC": "1"})
      False
    """
    env = os.environ if environ is None else environ
    if (env.get("SEVO_JAX_KEEP_MALLOC") == "1" or any(k in env for k in USER_SETTINGS)
            or not sys.platform.startswith("linux")):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no such symbol)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
