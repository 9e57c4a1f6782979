"""``latest.png``: throughput and peak RSS of each worker against the number of events.

Lines: the memory scenario (every worker at every size, live and bounded paths). Points: the
medians of the ratio scenarios at their event count. Both come from ``latest.json`` only, so
``python -m benchmarks --render results/latest.json`` redraws it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def series(results: dict[str, Any]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{"rate"|"rss": {label: [(events, value), ...]}}`` from the results."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {"rate": {}, "rss": {}}
    s = results.get("scenarios", {})
    mem = s.get("memory")
    if mem and "error" not in mem:
        for component, x in mem["components"].items():
            label = f"{component} ({x['path']})"
            out["rate"][label] = [(int(n), float(v)) for n, v in x["rate"].items() if v]
            out["rss"][label] = [(int(n), v / MIB) for n, v in x["peak_rss_bytes"].items() if v]
    points = {"archiver": s.get("archiver"), "loader": s.get("load")}
    processor = s.get("processor") or {}
    for variant, v in processor.get("variants", {}).items():
        points[f"processor {variant}"] = {**v, "records": processor["records"]}
    for mode, q in processor.get("quix", {}).items():  # the peer's own rate and RSS, same topic
        points[f"Quix Streams {mode}"] = {"records": processor["records"], "ours_rps": q["reference_rps"],
                                          "peak_rss_bytes": q.get("peak_rss_bytes", {})}
    for name, x in points.items():
        if not x or "error" in x or not x.get("ours_rps", {}).get("n"):
            continue
        label = f"{name} (ratio runs, median)"
        out["rate"][label] = [(int(x["records"]), x["ours_rps"]["median"])]
        if x.get("peak_rss_bytes", {}).get("n"):
            out["rss"][label] = [(int(x["records"]), x["peak_rss_bytes"]["median"] / MIB)]
    return out


def render(results: dict[str, Any], path: Path) -> Path | None:
    """Write the PNG; None (and a line on stderr) when there is nothing to draw or no matplotlib."""
    data = series(results)
    if not data["rate"] and not data["rss"]:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("chart not written: matplotlib is missing (pip install -e '.[bench]')", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    workers = sorted({label.split(" (")[0] for key in data for label in data[key]})
    palette = plt.get_cmap("tab10")
    color = {worker: palette(i % 10) for i, worker in enumerate(workers)}  # one colour per worker
    for ax, key, title, unit in ((axes[0], "rate", "Throughput", "records/s"), (axes[1], "rss", "Peak RSS", "MiB")):
        for label, values in sorted(data[key].items()):
            values = sorted(values)
            xs, ys = [v[0] for v in values], [v[1] for v in values]
            style = "o-" if len(values) > 1 else "s"
            ax.plot(xs, ys, style, label=label, color=color[label.split(" (")[0]],
                    markerfacecolor="none" if len(values) == 1 else None)
        ax.set_xscale("log")
        ax.set_xlabel("events")
        ax.set_ylabel(unit)
        top = max((v[1] for values in data[key].values() for v in values), default=1.0)
        ax.set_ylim(0, top * 1.15)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    meta = results.get("meta", {})
    commit = meta.get("commit", {}).get("short", "?")
    verdict = results.get("verdict", {})
    state = "PASSED" if verdict.get("passed") else "FAILED"
    fig.suptitle(f"kappa-dagster benchmarks @ {commit} ({state}; run {meta.get('run_id')}) {meta.get('label', '')}"
                 .strip(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
