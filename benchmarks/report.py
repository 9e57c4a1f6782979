"""results dict -> ``latest.json`` + ``latest.md`` (the Markdown table is also printed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _med(stat: dict | None, digits: int = 0, scale: float = 1.0) -> str:
    """``median (min-max)``."""
    if not stat or not stat.get("n"):
        return "-"
    median, low, high = stat["median"] / scale, stat["min"] / scale, stat["max"] / scale
    return f"{median:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def _ratio(stat: dict | None, target: float, at_most: bool = False) -> tuple[str, str]:
    if not stat or not stat.get("n"):
        return "-", "n/a"
    median = stat["median"]
    met = median <= target if at_most else median >= target
    text = f"**{median:.2f}** ({stat['min']:.2f}-{stat['max']:.2f})" if stat["n"] > 1 else f"**{median:.2f}**"
    return text, ("yes" if met else "**NO**")


def ratio_rows(results: dict[str, Any]) -> list[list[str]]:
    s = results.get("scenarios", {})
    rows: list[list[str]] = []

    def row(name: str, unit: str, ours: dict | None, ref: dict | None, ref_name: str, ratio: dict | None,
            target: float, digits: int = 0) -> None:
        text, met = _ratio(ratio, target)
        rows.append([name, unit, _med(ours, digits), ref_name, _med(ref, digits), text, f">= {target:g}", met])

    if "load" in s and "error" not in s["load"]:
        x = s["load"]
        row("1. Replay load (S3 -> replay topic)", "rec/s", x["ours_rps"], x["reference_rps"], "ProducerPerformance",
            x["ratio"], x["target"])
        row("1. Replay load (S3 -> replay topic)", "MiB/s", x["ours_mibps"], x["reference_mibps"],
            "ProducerPerformance", x["ratio_mibps"], x["target"], 1)
        if x.get("ratio_produce_phase"):
            row("1b. Replay load, produce phase only (info)", "rec/s", x["ours_produce_phase_rps"],
                x["reference_rps"], "ProducerPerformance", x["ratio_produce_phase"], x["target"])
    if "processor" in s and "error" not in s["processor"]:
        x = s["processor"]
        where = ""
        if x.get("topic") == "replay":  # the day's replay topic, with the grace the Dagster job passes
            where = f", replay topic, grace {x['grace_ms']} ms" if x.get("grace_ms") is not None else ", replay topic"
        row(f"2. Processor (consume+parse+window+dedup+write{where})", "rec/s", x["ours_rps"], x["reference_rps"],
            "ConsumerPerformance", x["ratio"], x["target"])
        q = x.get("quix")
        if q:
            check = q.get("totals_check", {})
            agree = "totals agree" if check.get("equal") else "TOTALS DIFFER"
            row(f"2. Processor vs Quix Streams ({q['records']:,} events; {agree})", "rec/s", q["ours_rps"],
                q["reference_rps"], "Quix Streams", q["ratio"], q["target"])
    if "archiver" in s and "error" not in s["archiver"]:
        x = s["archiver"]
        row("3. Archiver (topic -> Parquet in S3)", "rec/s", x["ours_rps"], x["reference_rps"], "ConsumerPerformance",
            x["ratio"], x["target"])
    return rows


def markdown(results: dict[str, Any]) -> str:
    meta, data, s = results.get("meta", {}), results.get("dataset", {}), results.get("scenarios", {})
    config = meta.get("config", {})
    lines = [
        "# kappa-dagster benchmark results",
        "",
        f"Run `{meta.get('run_id')}` at {meta.get('started_at')} ({meta.get('duration_s', '?')} s). "
        f"{meta.get('label') or ''}".rstrip(),
        "",
        f"**Sizes:** {config.get('events', 0):,} events for scenarios 1-4 ({data.get('mean_value_bytes', '?')} B "
        f"mean JSON value, {config.get('partitions')} partitions, replay topic {config.get('replay_partitions')} "
        f"partitions), {config.get('quix_events', 0):,} events for the Quix Streams comparison, memory at "
        + ", ".join(f"{n:,}" for n in config.get("memory_sizes", []))
        + f" events. {config.get('runs')} runs per scenario ({config.get('e2e_runs')} for e2e); "
        "figures are median (min-max); each ratio is computed per run (ours / reference measured back to back).",
        "",
        "## Ratios vs references",
        "",
        "| Scenario | Unit | Ours | Reference | Reference value | Ratio | Target | Met |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | :---: |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in ratio_rows(results)]
    for name in ("load", "processor", "archiver", "e2e", "memory"):
        if "error" in s.get(name, {}):
            error = " ".join(s[name]["error"].split())[:200].replace("|", "/")
            lines.append(f"| {name} | | FAILED: {error} | | | | | **NO** |")
    e2e = s.get("e2e")
    if e2e and "error" not in e2e:
        phases = e2e["phases_s"]
        lines += [
            "",
            f"## 4. End-to-end reprocess of one day through Dagster ({e2e['records']:,} events)",
            "",
            "`dagster job execute -m kappa_dagster -j reprocess --tags '{\"dagster/partition\": \"<day>\"}'` "
            "(run config `replay.force: true`, so every run really loads).",
            "",
            "| Wall time (s) | load (s) | consume (s) | report + checks (s) | Dagster/CLI overhead (s) "
            "| events/s overall |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {_med(e2e['wall_s'], 1)} | {_med(phases['load'], 1)} | {_med(phases['consume'], 1)} | "
            f"{_med(phases['report'], 1)} | {_med(e2e['dagster_overhead_s'], 1)} | "
            f"{_med(e2e['events_per_s'])} |",
        ]
    mem = s.get("memory")
    if mem and "error" not in mem:
        small, large = mem["sizes"][0], mem["sizes"][-1]
        lines += [
            "",
            f"## 5. Memory: peak RSS at {small:,} and {large:,} events",
            "",
            f"| Component | {small:,} events (MiB) | {large:,} events (MiB) | Ratio | Target | Met |",
            "| --- | ---: | ---: | ---: | ---: | :---: |",
        ]
        for component, x in mem["components"].items():
            peaks = x["peak_rss_bytes"]
            ratio = x["ratio"]
            met = "n/a" if ratio is None else ("yes" if ratio <= mem["target"] else "**NO**")
            lines.append(
                f"| {component} | {_n(peaks[str(small)] / MIB)} | {_n(peaks[str(large)] / MIB)} | "
                f"{_n(ratio, 2)} | <= {mem['target']:g} | {met} |"
            )
        if large < 10_000_000:
            lines.append("")
            lines.append(f"Largest size measured: {large:,} events (not 10M: configured smaller for this run).")
    lines += ["", "## Machine and versions", ""]
    machine = meta.get("machine", {})
    lines.append(
        f"- machine: {machine.get('cores')} cores ({machine.get('cpu')}), {machine.get('memory_gib')} GiB RAM, "
        f"kernel {machine.get('kernel')}; load average at start {meta.get('load_average_start')}, "
        f"at end {meta.get('load_average_end')}"
    )
    for name, version in meta.get("versions", {}).items():
        lines.append(f"- {name}: {version}")
    lines.append("")
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "latest.json", out / "latest.md"
    tmp = out / "latest.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(json_path)
    md_path.write_text(markdown(results))
    return json_path, md_path
