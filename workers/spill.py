"""Spill folders on local disk that outlive a crash only until the next one is made.

The replay loader sorts a day through Arrow files on local disk, and the reference report spills
its windows there. A process killed mid-way (SIGKILL, the OOM killer, a lost node's pod restarted
on the same host) cannot remove its folder, and retries of a big day would fill the disk. So each
folder is named after the host and the process that owns it, and making a new one first removes
those whose owner is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIX = "kappa-spill"


def _host() -> str:
    """The host part of a folder name: a process on another host (a shared temp dir) is never judged."""
    return re.sub(r"[^A-Za-z0-9.]", ".", socket.gethostname())[:60] or "host"


def _owner(folder: Path, host: str) -> int | None:
    """The pid in ``kappa-spill-<host>-<pid>-...`` if the folder was made on ``host``."""
    match = re.match(rf"{re.escape(PREFIX)}-{re.escape(host)}-(\d+)-", folder.name)
    return int(match.group(1)) if match else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep(root: Path | None = None) -> list[Path]:
    """Remove this host's spill folders whose process has exited; returns them."""
    host = _host()
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}-{host}-*"):
        pid = _owner(folder, host)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextmanager
def spill_dir(purpose: str, root: Path | None = None) -> Iterator[Path]:
    """A fresh folder for ``purpose`` (removed on exit), made after sweeping dead processes' folders."""
    sweep(root)
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", purpose)[:80]
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}-{_host()}-{os.getpid()}-{safe}-", dir=root) as folder:
        yield Path(folder)
