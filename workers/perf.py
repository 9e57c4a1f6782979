"""Small CPU helpers for the per-record hot loops (see benchmarks/README.md)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector around a hot loop that allocates only acyclic objects.

    The per-record paths allocate a few containers per record (messages, header lists and tuples);
    every 700 allocations CPython runs a collection that walks the young objects, and the older
    generations (all live containers) ever more often. Measured: ~35 % of the replay loader's
    produce phase, ~10 % of the processor. Reference counting still frees everything at once; the
    collector runs again as soon as the block is left (keep I/O-heavy code such as boto3 outside), so
    free the per-record objects inside the block: a collection walks every one still alive (the
    consumers call a function of their own, whose locals die before the block ends).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
