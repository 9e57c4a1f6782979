"""What the numbers were measured on: machine, load, versions."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from benchmarks import kafka_tools
from workers.config import cache_dir

QUIX_PYTHON = Path(__file__).resolve().parent / ".venv-quix" / "bin" / "python"


def _meminfo_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def _java() -> str:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30).stderr
        return out.splitlines()[0].strip() if out else "?"
    except (OSError, subprocess.SubprocessError):
        return "missing"


def _quix() -> str:
    if not QUIX_PYTHON.exists():
        return "not installed"
    code = "from importlib.metadata import version as v; print(v('quixstreams'), v('confluent-kafka'))"
    out = subprocess.run([str(QUIX_PYTHON), "-c", code], capture_output=True, text=True, timeout=60).stdout.split()
    return f"{out[0]} (confluent-kafka {out[1]})" if len(out) == 2 else "?"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def commit() -> dict[str, object]:
    """The commit measured, and whether tracked files had uncommitted changes (the results are not code)."""
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                      ":(top,exclude)benchmarks/results"))
    sha = _git("rev-parse", "HEAD") or "?"
    return {"sha": sha, "short": sha[:7], "dirty": dirty, "subject": _git("log", "-1", "--format=%s")}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def describe() -> dict:
    import confluent_kafka

    jars = sorted((cache_dir() / "jars" / "s3proxy").glob("s3proxy-*.jar"))
    return {
        "commit": commit(),
        "machine": {
            "cores": os.cpu_count(),
            "memory_gib": _meminfo_gib(),
            "cpu": _cpu_model(),
            "kernel": platform.release(),
        },
        "versions": {
            "python": sys.version.split()[0],
            "kappa-dagster": f"{_version('kappa-dagster')} @ {_git('rev-parse', '--short', 'HEAD') or '?'}",
            "confluent-kafka": f"{_version('confluent-kafka')} (librdkafka {confluent_kafka.libversion()[0]})",
            "polars": _version("polars"),
            "msgspec": _version("msgspec"),
            "dagster": _version("dagster"),
            "quixstreams": _quix(),
            "kafka (broker + tools)": kafka_tools.kafka_version(),
            "s3proxy": jars[0].stem.removeprefix("s3proxy-") if jars else "?",
            "java": _java(),
        },
    }
