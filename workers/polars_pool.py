"""How many threads polars may use in this process: chosen before polars is imported, which sizes its pool.

The processor folds one ``consume()`` result at a time (at most ``kafka.CONSUME_BYTES``, some 80k
records), a few milliseconds of polars work per partition. Frames that small gain little from the
pool, and every operation handed to it wakes its threads: with 2 cores and the broker beside it, one
thread cut the processor's CPU time by 6-7 % and its wall time by 4-7 % over 1M records, the shuffled
v2 no slower (benchmarks/README.md, "The sixth issue-14 round"). A processor scales with processes instead (more group
members, ``replay.consumers``), as Kafka Streams scales with stream threads. An explicit
``POLARS_MAX_THREADS`` wins; other commands (reports, checks, the archiver's Parquet) keep polars' default.

No polars import here, nor in anything this module imports.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

THREADS_ENV = "POLARS_MAX_THREADS"
#: commands whose process gets one polars thread unless ``POLARS_MAX_THREADS`` is set
ONE_THREAD_COMMANDS = frozenset({"processor"})


def command_of(argv: Sequence[str]) -> str | None:
    """The command word of a ``kappa`` command line (global options such as ``--debug`` come first)."""
    return next((arg for arg in argv[1:] if not arg.startswith("-")), None)


def size_for(argv: Sequence[str]) -> None:
    """Give a processor process one polars thread; a no-op once polars is imported (too late to choose)."""
    if "polars" in sys.modules:
        return
    if command_of(argv) in ONE_THREAD_COMMANDS:
        os.environ.setdefault(THREADS_ENV, "1")
