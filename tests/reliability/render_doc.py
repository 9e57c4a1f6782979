"""Generate docs/RELIABILITY.md from its template and the figures JSON of green runs.

``make reliability-figures`` (default run) and ``make soak`` move their JSON into docs/ only when
pytest exits 0, then run this. A JSON that is missing or not from a green run is ignored, and every
figure it would give reads "not measured in this run": the doc never shows a number no green run
measured.

    python -m tests.reliability.render_doc [--default docs/reliability-figures.json]
        [--soak docs/reliability-figures-soak.json] [--out docs/RELIABILITY.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .invariants import SUMMARIES

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = Path(__file__).with_name("RELIABILITY.template.md")
NOT_MEASURED = "not measured in this run"
Figures = dict[str, Any]


def load(path: Path) -> Figures | None:
    """The figures of a green run at ``path``, else None (with a note on stderr saying why)."""
    if not path.exists():
        print(f"render_doc: {path} does not exist: its figures read '{NOT_MEASURED}'", file=sys.stderr)
        return None
    figures = json.loads(path.read_text())
    if not figures.get("run", {}).get("green"):
        print(f"render_doc: {path} is not from a green run: ignored", file=sys.stderr)
        return None
    return figures


# ---------------------------------------------------------------- figures -> cells


def faults(prefix: str) -> Callable[[Figures], str]:
    """Landed faults whose kind is ``prefix`` or starts with ``prefix.``."""
    def cell(figures: Figures) -> str:
        found = {k: n for k, n in figures.get("faults", {}).items() if k == prefix or k.startswith(prefix + ".")}
        total = sum(found.values())
        if not total:
            return NOT_MEASURED
        parts = [f"{kind.removeprefix(prefix + '.')} {n}" for kind, n in sorted(found.items()) if kind != prefix]
        return f"**{total:,}**" + (f" ({', '.join(parts)})" if len(parts) > 1 else "")
    return cell


def total(name: str) -> Callable[[Figures], str]:
    def cell(figures: Figures) -> str:
        totals = figures.get("totals", {})
        return f"{totals[name]:,}" if name in totals else NOT_MEASURED
    return cell


def samples(prefix: str) -> Callable[[Figures], str]:
    """Median and max of every sample named ``prefix`` or ``prefix.<worker>`` (e.g. takeover seconds)."""
    def cell(figures: Figures) -> str:
        found = {k: v for k, v in figures.get("samples", {}).items() if (k == prefix or k.startswith(prefix + "."))}
        if not any(found.values()):
            return NOT_MEASURED
        return "; ".join(f"{name.removeprefix(prefix + '.') if name != prefix else 'all'}: median "
                         f"{statistics.median(values):.1f} s, max {max(values):.1f} s (n={len(values)})"
                         for name, values in sorted(found.items()) if values)
    return cell


#: The figures issue 16 asks for, and where each comes from.
HEADLINE: list[tuple[str, Callable[[Figures], str]]] = [
    ("kill -9 of the archiver (kills that landed mid-work)", faults("sigkill.archiver")),
    ("kill -9 of the live processor", faults("sigkill.processor.live")),
    ("kill -9 of the bounded (replay) processor", faults("sigkill.processor.bounded")),
    ("kill -9 of the replay loader", faults("sigkill.replay_loader")),
    ("rebalance storm stops (SIGTERM / SIGKILL of a consuming member)", faults("rebalance")),
    ("zombie rounds (SIGSTOP past the session timeout, takeover, SIGCONT)", faults("zombie")),
    ("broker restarts while a worker was mid-stream", faults("broker_restart")),
    ("broker freezes (SIGSTOP: requests never answered) while a worker was mid-stream", faults("broker_freeze")),
    ("S3 outages the worker saw as errors", faults("s3_outage")),
    ("fuzzed records through archiver, processor and replay", faults("fuzz.records")),
    ("fuzzed values through the parser alone", total("fuzz_parse_values")),
    ("takeover after kill -9 (restart to working again)", samples("takeover_s")),
]

CHECKS: list[tuple[str, Callable[[Figures], str]]] = [
    ("records compared byte-exact with a plain read of the topic", total("records_checked")),
    ("archive rows read", total("archive_rows_read")),
    ("archive overlap rows (byte-identical copies a crash left; readers drop them)", total("archive_overlap_rows")),
    ("archive extra rows (offsets the topic never had)", total("archive_extra_rows")),
    ("archive rows with other bytes than the topic", total("archive_differing_rows")),
    ("topic records without a byte-exact archive row", total("archive_missing_rows")),
    ("replayed records checked / missing / replayed twice / differing",
     lambda f: " / ".join(total(n)(f) for n in ("replay_records_checked", "replay_missing", "replay_repeated",
                                                "replay_differing"))),
    ("reports and live result sets checked / rows / events",
     lambda f: " / ".join(total(n)(f) for n in ("reports_checked", "report_rows_checked", "report_events_checked"))),
    ("report events missing / extra", lambda f: f"{total('report_events_missing')(f)} / "
                                                f"{total('report_events_extra')(f)}"),
    ("DLQ records checked / malformed missing / valid sent / altered",
     lambda f: " / ".join(total(n)(f) for n in ("dlq_records_checked", "dlq_missing", "dlq_unexpected",
                                                "dlq_altered"))),
    ("**lost** (" + " + ".join(SUMMARIES["lost"]) + ")", lambda f: f"**{total('lost')(f)}**"),
    ("**duplicated** (" + " + ".join(SUMMARIES["duplicated"]) + ")", lambda f: f"**{total('duplicated')(f)}**"),
]


# ---------------------------------------------------------------- markdown


def table(rows: list[tuple[str, Callable[[Figures], str]]], runs: list[Figures | None]) -> str:
    lines = ["| | default run | soak run |", "|---|---|---|"]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(r) if r else NOT_MEASURED for r in runs) + " |")
    return "\n".join(lines)


def run_lines(name: str, path: str, figures: Figures | None) -> str:
    if figures is None:
        return f"* **{name}** (`{path}`): no green run recorded; its figures read \"{NOT_MEASURED}\"."
    run = figures["run"]
    dirty = " plus uncommitted changes" if run.get("uncommitted_changes") else ""
    return (f"* **{name}** ([`{Path(path).name}`]({Path(path).name})): commit `{run['commit'][:12]}`{dirty}, "
            f"{run['date']}, `{run['command']}`: **{run['passed']} passed**, {run['failed']} failed, "
            f"{run['errors']} errors, {run['skipped']} skipped in {run['seconds'] // 60} min {run['seconds'] % 60} s.")


def per_test(figures: Figures | None) -> str:
    if figures is None:
        return f"Per test: {NOT_MEASURED}."
    lines = ["| test | faults landed | records checked | lost | duplicated |", "|---|---|---|---|---|"]
    for test, counts in figures.get("tests", {}).items():
        landed = sum(n for k, n in counts.items() if k.startswith("fault:"))
        checked = counts.get("records_checked", 0) + counts.get("replay_records_checked", 0)
        lost = sum(counts.get(k, 0) for k in SUMMARIES["lost"])
        duplicated = sum(counts.get(k, 0) for k in SUMMARIES["duplicated"])
        if landed or checked:
            lines.append(f"| `{test.removeprefix('tests/reliability/')}` | {landed:,} | {checked:,} | {lost} | "
                         f"{duplicated} |")
    return "\n".join(lines)


def md(text: str, code: bool = False) -> str:
    """``text`` safe inside a markdown table cell (optionally as code)."""
    text = text.replace("|", "\\|").replace("\n", " ")
    return "`" + text.replace("`", "'") + "`" if code else text


def fuzz_example(runs: list[Figures | None]) -> str:
    """The recorded end-to-end fuzz example (the default run's, else the soak run's)."""
    example = next((r["notes"]["fuzz_example"] for r in runs if r and "fuzz_example" in r.get("notes", {})), None)
    if example is None:
        return f"Recorded fuzz example: {NOT_MEASURED}."
    categories = ", ".join(f"{name} {n}" for name, n in example["categories"].items())
    lines = [f"Seed **{example['seed']}**: {example['records']} records, {example['valid']} valid by construction "
             f"({categories}). Replay it with `{example['replay']}`. One record per category:", "",
             "| category | valid | key | value | headers | timestamp (ms) |", "|---|---|---|---|---|---|"]
    for item in example["sample"]:
        headers = ", ".join(f"{k!r}={v}" for k, v in item["headers"]) or "-"
        cells = [md(item["category"]), str(item["valid"]).lower(), md(item["key"], code=True),
                 md(item["value"], code=True), md(headers), str(item["timestamp_ms"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figures_section(default_path: str, soak_path: str, default: Figures | None, soak: Figures | None) -> str:
    runs = [default, soak]
    return "\n\n".join([
        run_lines("default run", default_path, default), run_lines("soak run", soak_path, soak),
        "### The figures issue 16 asks for", table(HEADLINE, runs),
        "### What the checks found", table(CHECKS, runs),
        "### Per test (default run)", per_test(default),
        "### The recorded end-to-end fuzz example", fuzz_example(runs),
    ])


def render(default_path: str, soak_path: str) -> str:
    default, soak = load(ROOT / default_path), load(ROOT / soak_path)
    return TEMPLATE.read_text().replace("{{FIGURES}}", figures_section(default_path, soak_path, default, soak))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default", default="docs/reliability-figures.json", help="default run JSON (repo-relative)")
    parser.add_argument("--soak", default="docs/reliability-figures-soak.json", help="soak run JSON (repo-relative)")
    parser.add_argument("--out", default="docs/RELIABILITY.md", help="the generated doc (repo-relative)")
    args = parser.parse_args(argv)
    (ROOT / args.out).write_text(render(args.default, args.soak))
    print(f"render_doc: wrote {args.out}")


if __name__ == "__main__":
    main()
