"""The one S3 outage policy: which errors are transient, how long to wait between tries, when to give up.

Workers wait an S3 outage out instead of crashing (the archive and the checkpoints are in S3, so there
is nothing useful to do meanwhile): they pause consumption, retry with exponential backoff up to a cap,
and keep the last durable checkpoint as the resume point if they must give up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from workers.errors import KappaError

log = logging.getLogger("kappa.s3")

#: S3 failures waited out (connection refused or reset, timeouts, 5xx, throttling)
S3_ERRORS: tuple[type[Exception], ...] = (BotoCoreError, ClientError, OSError)
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
#: how long a blocking call (shutdown checkpoint, report write) keeps retrying by default
GIVE_UP_S = 120.0
T = TypeVar("T")


class S3Unavailable(KappaError):
    """S3 kept failing past the give-up deadline (or the worker was stopped while it failed)."""


@dataclass
class Backoff:
    """When to try S3 again: ``delay`` 0 while healthy, then 0.5 s doubling per failure up to a cap."""

    delay: float = 0.0
    retry_at: float = 0.0  # time.monotonic() of the next try

    @property
    def failing(self) -> bool:
        return self.delay > 0

    def failed(self, cap: float = MAX_BACKOFF_S) -> float:
        """One more failure: the next delay (also stored with the time of the next try)."""
        self.delay = min(cap, self.delay * 2 or FIRST_BACKOFF_S)
        self.retry_at = time.monotonic() + self.delay
        return self.delay

    def waiting(self, now: float) -> bool:
        return now < self.retry_at

    def reset(self) -> None:
        self.delay = self.retry_at = 0.0


def describe(exc: BaseException) -> str:
    """A short name for an S3 failure: the S3 error code, else the exception."""
    if isinstance(exc, ClientError):
        return f"{exc.response.get('Error', {}).get('Code', 'error')}"
    return f"{type(exc).__name__}: {exc}"


def call_s3(
    call: Callable[[], T],
    what: str,
    *,
    give_up_s: float | None = GIVE_UP_S,
    stop: threading.Event | None = None,
    cap: float = MAX_BACKOFF_S,
    on_error: Callable[[Exception], None] | None = None,
    logger: logging.Logger = log,
) -> T:
    """``call()``, retried through an S3 outage with :class:`Backoff` until it works, ``give_up_s``
    passes (None: never) or ``stop`` is set; then :class:`S3Unavailable` with one clear line."""
    backoff = Backoff()
    deadline = None if give_up_s is None else time.monotonic() + give_up_s
    while True:
        try:
            return call()
        except S3_ERRORS as exc:
            if on_error is not None:
                on_error(exc)
            delay = backoff.failed(cap)
            if stop is not None and stop.is_set():
                raise S3Unavailable(f"stopped while S3 was failing ({what}: {describe(exc)})") from None
            if deadline is not None and time.monotonic() + delay > deadline:
                raise S3Unavailable(f"S3 kept failing for {give_up_s:.0f}s during the {what} ({describe(exc)}); "
                                    "a restart resumes from the last checkpoint") from None
            logger.warning("S3 %s failed (%s); retry in %.1fs", what, describe(exc), delay)
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
