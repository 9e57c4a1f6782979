"""results dict -> ``latest.json`` + ``latest.md`` + ``latest.png`` (the Markdown is also printed).

``make bench`` (the ratios) and ``make bench-memory`` (RSS at 1M and 10M) are separate runs that
write into the same ``latest.json``: a run replaces the sections it measured and keeps the others,
and every section names the run and commit it comes from. Pass/fail is computed here, from every
section present, so a merged file says whether all of it passed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.stats import summary

MIB = 1024 * 1024
SECTIONS = ("load", "processor", "archiver", "e2e", "memory")
#: sections that carry a target; the run is complete when all of them are present
TARGET_SECTIONS = ("load", "processor", "archiver", "memory")
BENCH_MINUTES = 20  # `make bench` (the ratio scenarios) must fit this


def _n(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _med(stat: dict | None, digits: int = 0, scale: float = 1.0) -> str:
    """``median (min-max)``."""
    if not stat or not stat.get("n"):
        return "-"
    median, low, high = stat["median"] / scale, stat["min"] / scale, stat["max"] / scale
    return f"{median:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


# ---------------------------------------------------------------------- merge of runs


def previous(out: Path) -> dict[str, Any] | None:
    path = out / "latest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus the sections of ``old`` it did not measure (only sections that name their run)."""
    if not old:
        return new
    kept = {name: section for name, section in old.get("scenarios", {}).items()
            if name not in new["scenarios"] and "provenance" in section}
    new["scenarios"].update(kept)
    if kept and "dataset" not in new and "dataset" in old:
        new["dataset"] = old["dataset"]
    meta = new.setdefault("meta", {})
    meta["carried_over"] = sorted(kept)
    # a `make bench-memory` run merged onto a `make bench` run keeps that run's duration (a target)
    carried = bench_run(old.get("meta", {}))
    if bench_run(meta) is None and carried is not None and set(kept) - {"memory"}:
        meta["bench_run"] = carried
    return new


def bench_run(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The `make bench` run whose sections these results hold: this run when it measured more than
    memory, else the one :func:`merge` carried over (its duration is checked against a target)."""
    config = meta.get("config", {})
    if set(config.get("scenarios", [])) - {"memory"} and meta.get("duration_s") is not None:
        return {"run_id": meta.get("run_id"), "duration_s": meta["duration_s"], "quick": bool(config.get("quick"))}
    return meta.get("bench_run")


# ---------------------------------------------------------------------- checks


def _check(name: str, stat: dict | None, target: float, at_most: bool = False) -> dict[str, Any]:
    median = stat.get("median") if stat else None
    met = median is not None and (median <= target if at_most else median >= target)
    return {"name": name, "median": median, "min": (stat or {}).get("min"), "max": (stat or {}).get("max"),
            "target": target, "op": "<=" if at_most else ">=", "met": met}


def checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of issue 14 that the results hold (met = the median meets it), plus equality checks."""
    s, out = results.get("scenarios", {}), []
    for name, title in (("archiver", "archiver vs ConsumerPerformance"), ("load", "loader vs ProducerPerformance")):
        x = s.get(name)
        if x and "error" not in x:
            out.append(_check(title, x["ratio"], x["target"]))
    x = s.get("processor")
    if x and "error" not in x:
        for variant, v in x.get("variants", {}).items():
            if v.get("target") is not None:
                out.append(_check(f"processor {variant} vs ConsumerPerformance", v["ratio"], v["target"]))
            for other, check in v.get("same_totals_as", {}).items():  # every variant's report vs the peer's
                out.append({"name": f"per-(window, type) totals: {variant} == {other.replace('quix-', 'Quix ')}",
                            "met": bool(check.get("equal")), "target": None})
        for mode, q in x.get("quix", {}).items():
            if q.get("ratio") is not None and q.get("target") is not None:
                out.append(_check(f"processor {q['ours']} vs Quix Streams ({mode})", q["ratio"], q["target"]))
    run = bench_run(results.get("meta", {}))
    if run is not None and not run["quick"]:
        minutes = run["duration_s"] / 60
        out.append(_check("`make bench` minutes", {"median": minutes, "min": minutes, "max": minutes},
                          BENCH_MINUTES, at_most=True))
    x = s.get("memory")
    if x and "error" not in x:
        for component, c in x["components"].items():
            ratio = c.get("ratio")
            stat = {"median": ratio, "min": ratio, "max": ratio} if ratio is not None else None
            out.append(_check(f"RSS {x['sizes'][-1]:,} / {x['sizes'][0]:,} events: {component} ({c['path']})",
                              stat, x["target"], at_most=True))
    return out


def verdict(results: dict[str, Any]) -> dict[str, Any]:
    """``passed``: every check present is met and no section failed; ``complete``: every target section is there."""
    s = results.get("scenarios", {})
    all_checks = checks(results)
    failed_sections = sorted(name for name, x in s.items() if "error" in x)
    missing = [name for name in TARGET_SECTIONS if name not in s]
    memory = s.get("memory", {})
    if memory and "error" not in memory and memory["sizes"][-1] < 10_000_000:
        missing.append("memory at 10M events")
    quick = sorted(name for name, x in s.items() if x.get("provenance", {}).get("quick"))
    commits = sorted({x["provenance"]["commit"] for x in s.values() if "provenance" in x})
    return {
        "commits": commits,
        "passed": bool(all_checks) and all(c["met"] for c in all_checks) and not failed_sections,
        "complete": not missing and not quick and len(commits) <= 1,
        "checks_met": sum(1 for c in all_checks if c["met"]), "checks": len(all_checks),
        "missed": [c["name"] for c in all_checks if not c["met"]],
        "failed_sections": failed_sections, "missing": missing, "quick_sections": quick,
    }


# ---------------------------------------------------------------------- Markdown


def _ratio_text(stat: dict | None) -> str:
    if not stat or not stat.get("n"):
        return "-"
    return f"**{stat['median']:.2f}** ({stat['min']:.2f}-{stat['max']:.2f})" if stat["n"] > 1 else \
        f"**{stat['median']:.2f}**"


def _met(stat: dict | None, target: float | None) -> str:
    if target is None:
        return "info"
    if not stat or not stat.get("n"):
        return "n/a"
    return "yes" if stat["median"] >= target else "**NO**"


def ratio_rows(results: dict[str, Any]) -> list[list[str]]:
    s = results.get("scenarios", {})
    rows: list[list[str]] = []

    def row(name: str, unit: str, ours: dict | None, ref_name: str, ref: dict | None, ratio: dict | None,
            target: float | None, digits: int = 0) -> None:
        rows.append([name, unit, _med(ours, digits), ref_name, _med(ref, digits), _ratio_text(ratio),
                     "-" if target is None else f">= {target:g}", _met(ratio, target)])

    x = s.get("load")
    if x and "error" not in x:
        row("1. Replay load (S3 -> replay topic)", "rec/s", x["ours_rps"], "ProducerPerformance", x["reference_rps"],
            x["ratio"], x["target"])
        row("1. Replay load (S3 -> replay topic)", "MiB/s", x["ours_mibps"], "ProducerPerformance",
            x["reference_mibps"], x["ratio_mibps"], x["target"], 1)
        if x.get("ratio_produce_phase"):
            row("1b. Replay load, produce phase only", "rec/s", x["ours_produce_phase_rps"], "ProducerPerformance",
                x["reference_rps"], x["ratio_produce_phase"], None)
    x = s.get("processor")
    if x and "error" not in x:
        where = f"replay topic, grace {x['grace_ms']} ms" if x.get("grace_ms") is not None else "replay topic"
        for variant, v in x.get("variants", {}).items():
            row(f"2. Processor {variant}: {v['label']} ({where})", "rec/s", v["ours_rps"], "ConsumerPerformance",
                x["reference_rps"], v["ratio"], v.get("target"))
        for variant, reason in x.get("skipped", {}).items():
            rows.append([f"2. Processor {variant}", "", f"skipped: {reason}", "", "", "", "", "-"])
        for mode, q in x.get("quix", {}).items():
            if q.get("ratio") is None:
                continue
            agree = "totals agree" if q.get("totals_check", {}).get("equal") else "TOTALS DIFFER"
            topics = ", ".join(q.get("internal_topics") or []) or "no internal topics"
            row(f"2. Processor {q['ours']} vs Quix Streams, {mode} ({x['records']:,} events; {agree}; {topics})",
                "rec/s", q["ours_rps"], f"Quix Streams ({mode})", q["reference_rps"], q["ratio"], q.get("target"))
        if x.get("bare_loop_rps"):
            row("2b. Bare Python consume loop on the replay topic (processor's consumer settings, no work per "
                "record)", "rec/s", x["bare_loop_rps"], "ConsumerPerformance", x["reference_rps"],
                x["ratio_bare_loop"], None)
        for mode, q in x.get("quix", {}).items():
            if q.get("ceiling_ratio"):
                row(f"2c. Ceiling: that bare loop vs Quix Streams, {mode} (no Python processor on this client "
                    "beats this ratio)", "rec/s", x["bare_loop_rps"], f"Quix Streams ({mode})", q["reference_rps"],
                    q["ceiling_ratio"], None)
    x = s.get("archiver")
    if x and "error" not in x:
        row("3. Archiver (topic -> Parquet in S3)", "rec/s", x["ours_rps"], "ConsumerPerformance", x["reference_rps"],
            x["ratio"], x["target"])
        if x.get("bare_loop_rps"):
            row("3b. Bare Python consume loop (confluent-kafka, archiver's settings, no work per record)", "rec/s",
                x["bare_loop_rps"], "ConsumerPerformance", x["reference_rps"], x["ratio_bare_loop"], None)
            row("3c. Archiver vs that bare loop", "rec/s", x["ours_rps"], "bare consume loop", x["bare_loop_rps"],
                x["ratio_to_bare_loop"], None)
    return rows


def _header(results: dict[str, Any]) -> list[str]:
    meta, data, v = results.get("meta", {}), results.get("dataset", {}), verdict(results)
    commit = meta.get("commit", {})
    result = "PASSED" if v["passed"] else "FAILED"
    lines = [
        "# kappa-dagster benchmark results",
        "",
        f"**Result: {result}** ({v['checks_met']} of {v['checks']} checks met"
        + (f"; missed: {'; '.join(v['missed'])}" if v["missed"] else "")
        + (f"; failed sections: {', '.join(v['failed_sections'])}" if v["failed_sections"] else "") + "). "
        + ("All sections present." if v["complete"] else "**Incomplete**: "
           + "; ".join([*(f"{m} not measured" for m in v["missing"]),
                        *(f"{q} from a quick run" for q in v["quick_sections"]),
                        *([f"sections from {len(v['commits'])} commits"] if len(v["commits"]) > 1 else [])]) + "."),
        "",
        f"Commit `{commit.get('short', '?')}`{' (with uncommitted changes)' if commit.get('dirty') else ''} "
        f"{commit.get('subject', '')}. Run `{meta.get('run_id')}` at {meta.get('started_at')} "
        f"({meta.get('duration_s', '?')} s). {meta.get('label') or ''}".rstrip(),
        *(["", f"**Sections come from different commits: {', '.join(v['commits'])}.**"] if len(v["commits"]) > 1
          else []),
        "",
        "| Section | Run | Commit | Runs | Events |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for name in SECTIONS:
        p = results.get("scenarios", {}).get(name, {}).get("provenance")
        if p:
            quick = " (QUICK)" if p.get("quick") else ""
            events = p["events"] if isinstance(p["events"], list) else [p["events"]]
            lines.append(f"| {name} | `{p['run_id']}` {p['started_at']}{quick} | `{p['commit']}`"
                         f"{'+dirty' if p.get('dirty') else ''} | {p['runs']}{' per size' if name == 'memory' else ''}"
                         f" | {', '.join(f'{n:,}' for n in events)} |")
    if data:
        lines += ["", f"Dataset: {data.get('records', 0):,} events, {data.get('mean_value_bytes', '?')} B mean JSON "
                  f"value, {data.get('partitions')} partitions (replay topic "
                  f"{meta.get('config', {}).get('replay_partitions')} partitions). Figures are median (min-max); each "
                  "ratio is computed per run (ours / reference measured back to back, order alternating)."]
    return lines


def _e2e_lines(e2e: dict[str, Any]) -> list[str]:
    phases = e2e["phases_s"]
    return [
        "",
        f"## 4. End-to-end reprocess of one day through Dagster ({e2e['records']:,} events)",
        "",
        "`dagster job execute -m kappa_dagster -j reprocess --tags '{\"dagster/partition\": \"<day>\"}'` "
        "(run config `replay.force: true`, so every run really loads).",
        "",
        "| Wall time (s) | load (s) | consume (s) | report + checks (s) | report + checks / consume "
        "| Dagster/CLI overhead (s) | events/s overall |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {_med(e2e['wall_s'], 1)} | {_med(phases['load'], 1)} | {_med(phases['consume'], 1)} | "
        f"{_med(phases['report'], 1)} | {_med(report_vs_consume(e2e), 2)} | {_med(e2e['dagster_overhead_s'], 1)} | "
        f"{_med(e2e['events_per_s'])} |",
        "",
        "Issue 14 asks the report and its checks to take about as long as the consume step (ratio ~1).",
    ]


def report_vs_consume(e2e: dict[str, Any]) -> dict[str, Any] | None:
    """Per Dagster run: (report + asset checks) / consume, from the runs' step durations."""
    from benchmarks.runner import e2e_phase  # the runner's own phase split (it imports the workers)

    values = []
    for run in e2e.get("runs", []):
        phases = {"consume": 0.0, "report": 0.0}
        for step, seconds in run["steps"].items():
            if e2e_phase(step) in phases:
                phases[e2e_phase(step)] += seconds
        if phases["consume"] > 0:
            values.append(phases["report"] / phases["consume"])
    return summary(values) if values else None


def _memory_lines(mem: dict[str, Any]) -> list[str]:
    sizes = mem["sizes"]
    small, large = sizes[0], sizes[-1]
    lines = [
        "",
        f"## 5. Memory: peak RSS from {small:,} to {large:,} events ({mem['pipeline']}; mean JSON value "
        + ", ".join(f"{v} B" for v in sorted(set(mem.get("mean_value_bytes", {}).values()))) + ")",
        "",
        "| Component | Path | " + " | ".join(f"{n:,} events: MiB (rec/s)" for n in sizes)
        + f" | RSS {large:,} / {small:,} | Target | Met |",
        "| --- | --- | " + " | ".join("---:" for _ in sizes) + " | ---: | ---: | :---: |",
    ]
    for component, x in mem["components"].items():
        ratio = x["ratio"]
        met = "n/a" if ratio is None else ("yes" if ratio <= mem["target"] else "**NO**")
        cells = [f"{_n(x['peak_rss_bytes'][str(n)] / MIB)} ({_n(x['rate'][str(n)])})" for n in sizes]
        lines.append(f"| {component} | {x['path']} | " + " | ".join(cells)
                     + f" | {_n(ratio, 2)} | <= {mem['target']:g} | {met} |")
    lines += ["", "Each peak is the process's own `ru_maxrss` (one process per worker and size, imports included); "
              "live = the archiver and the live processor over the source topic from its beginning, bounded = "
              "the replay loader and the bounded processor over the loader's replay topic."]
    if large < 10_000_000:
        lines += ["", f"Largest size measured: {large:,} events (not 10M: configured smaller for this run)."]
    return lines


def markdown(results: dict[str, Any], chart: str | None = "latest.png") -> str:
    meta, s = results.get("meta", {}), results.get("scenarios", {})
    lines = [*_header(results), "", "## Ratios vs references", "",
             "| Scenario | Unit | Ours | Reference | Reference value | Ratio | Target | Met |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | :---: |"]
    lines += ["| " + " | ".join(r) + " |" for r in ratio_rows(results)]
    for name in SECTIONS:
        if "error" in s.get(name, {}):
            error = " ".join(s[name]["error"].split())[:200].replace("|", "/")
            lines.append(f"| {name} | | FAILED: {error} | | | | | **NO** |")
    if s.get("e2e") and "error" not in s["e2e"]:
        lines += _e2e_lines(s["e2e"])
    if s.get("memory") and "error" not in s["memory"]:
        lines += _memory_lines(s["memory"])
    if chart:
        lines += ["", "## Throughput and RSS against events", "", f"![throughput and RSS]({chart})"]
    lines += ["", "## Machine and versions", ""]
    machine = meta.get("machine", {})
    lines.append(
        f"- machine: {machine.get('cores')} cores ({machine.get('cpu')}), {machine.get('memory_gib')} GiB RAM, "
        f"kernel {machine.get('kernel')}; load average at start {meta.get('load_average_start')}, "
        f"at end {meta.get('load_average_end')}"
    )
    lines += [f"- {name}: {version}" for name, version in meta.get("versions", {}).items()]
    lines.append("")
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> tuple[Path, Path, Path | None]:
    from benchmarks import chart

    out.mkdir(parents=True, exist_ok=True)
    results["verdict"] = verdict(results)
    json_path, md_path = out / "latest.json", out / "latest.md"
    png = chart.render(results, out / "latest.png")
    tmp = out / "latest.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(json_path)
    md_path.write_text(markdown(results, png.name if png else None))
    return json_path, md_path, png
