"""Start the dashboard in the background and photograph it: used by ``make demo`` and the browser test.

``python -m workers.dashboard.launch --url http://127.0.0.1:8050 --out docs/dashboard.png`` takes a
screenshot of a running dashboard with headless Chromium (Debian's ``chromium``; ``make browser``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from workers.errors import KappaError

CHROMIUM = Path(os.environ.get("KAPPA_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def spawn(port: int = 8050, interval: float = 2.0, env: Mapping[str, str] | None = None, log: Path | None = None):
    """``kappa dashboard`` as a child process (stdout/stderr to ``log``); returns (process, url)."""
    kappa = str(Path(sys.executable).parent / "kappa")
    out = log.open("w") if log else subprocess.DEVNULL
    command = [kappa, "dashboard", "--port", str(port), "--interval", str(interval)]
    process = subprocess.Popen(command, env=dict(env or os.environ), stdout=out, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Poll ``/api/health`` until it answers; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise KappaError(f"the dashboard exited with code {process.returncode} before answering on {url}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/api/health", timeout=5) as response:
            return json.loads(response.read())
        time.sleep(0.3)
    raise KappaError(f"the dashboard did not answer on {url} within {timeout:.0f}s")


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A Playwright page in headless Chromium with a throw-away profile."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise KappaError("playwright is missing: pip install -e '.[dev]'") from None
    if not CHROMIUM.exists():
        raise KappaError(f"no Chromium at {CHROMIUM}: run `make browser` (or set KAPPA_CHROMIUM)")
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="kappa-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def wait_rendered(page: Any, updates: int = 1, timeout_ms: int = 30_000) -> None:
    """Until the page has rendered ``updates`` pushed snapshots."""
    page.wait_for_function(
        "(n) => Number(document.body.dataset.updates || 0) >= n", arg=updates, timeout=timeout_ms
    )


def screenshot(url: str, out: Path, settle_ms: int = 1500) -> Path:
    """Open the dashboard, wait for two live updates, save a full-page PNG."""
    wait_ready(url.split("?", 1)[0].rstrip("/"), timeout=10)
    with browser_page() as page:
        page.goto(url)
        wait_rendered(page, updates=2)
        page.wait_for_timeout(settle_ms)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshot a running kappa dashboard.")
    parser.add_argument("--url", default="http://127.0.0.1:8050", help="dashboard address (with ?day=... if wanted)")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    args = parser.parse_args()
    try:
        print(screenshot(args.url, args.out))
    except KappaError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
