"""The benchmark's bookkeeping (no broker, no timing): which processor rows run at this commit, the
totals comparison with the Quix peer, pass/fail, the merge of `make bench` and `make bench-memory`
results, and that the report and chart render from a results file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks import cli, report
from benchmarks.runner import PROCESSOR_VARIANTS, ProcessorVariant, compare_windows, variant_unavailable
from workers.pipelines import get_pipeline


def stat(*values: float) -> dict[str, Any]:
    ordered = sorted(values)
    return {"n": len(values), "median": ordered[len(values) // 2], "min": ordered[0], "max": ordered[-1],
            "values": list(values)}


def provenance(commit: str = "abc1234", quick: bool = False) -> dict[str, Any]:
    return {"run_id": "b1", "commit": commit, "dirty": False, "started_at": "t", "runs": 5, "events": [1_000_000],
            "quick": quick, "label": ""}


def results(*, v1_vs_cp: float = 0.6, v1_vs_quix: float = 6.0, totals_equal: bool = True, largest: int = 10_000_000,
            loader_rss_ratio: float = 1.1, quick: bool = False) -> dict[str, Any]:
    ratio_section = {"ours_rps": stat(1.0), "reference_rps": stat(2.0), "ratio": stat(0.55), "target": 0.5,
                     "records": 1_000_000, "peak_rss_bytes": stat(100.0), "provenance": provenance(quick=quick)}
    memory = {"sizes": [1_000_000, largest], "target": 1.2, "pipeline": "orders v2", "value_bytes": 100,
              "provenance": provenance(), "components": {
                  name: {"path": path, "peak_rss_bytes": {"1000000": 100 * 2**20, str(largest): 110 * 2**20},
                         "rate": {"1000000": 1e5, str(largest): 1e5},
                         "ratio": loader_rss_ratio if name == "loader" else 1.1}
                  for name, path in (("archiver", "live"), ("processor live", "live"), ("loader", "bounded"),
                                     ("processor bounded", "bounded"))}}
    processor = {
        "records": 1_000_000, "grace_ms": 0, "reference_rps": stat(5e5), "provenance": provenance(),
        "skipped": {"v2-shuffle": "not available at this commit (attr:state_key missing)"},
        "variants": {"v1": {"label": "orders v1", "ours_rps": stat(3e5), "target": 0.5, "peak_rss_bytes": stat(1e8),
                            "ratio": stat(v1_vs_cp - 0.05, v1_vs_cp, v1_vs_cp + 0.1),
                            "same_totals_as": {"quix-best": {"equal": totals_equal}}}},
        "quix": {"best": {"mode": "best", "ours": "v1", "ours_rps": stat(3e5), "reference_rps": stat(5e4),
                          "ratio": stat(v1_vs_quix), "target": 5.0, "internal_topics": [],
                          "totals_check": {"equal": totals_equal}, "peak_rss_bytes": stat(1e8),
                          "ceiling_ratio": stat(8.0)}},
        "bare_loop_rps": stat(4e5), "ratio_bare_loop": stat(0.8),
    }
    return {"meta": {"commit": {"short": "abc1234"}, "run_id": "b1"},
            "scenarios": {"archiver": dict(ratio_section), "load": dict(ratio_section, ours_mibps=stat(1.0),
                                                                         reference_mibps=stat(2.0),
                                                                         ratio_mibps=stat(0.55)),
                          "processor": processor, "memory": memory}}


def test_v1_and_the_v2_shuffle_rows_run_at_this_commit_and_the_old_v2_row_gives_way() -> None:
    """v2 declares its state key: its row is the shuffle; the single-stage v2 row is for older commits."""
    assert not get_pipeline("orders", 1).state_key and get_pipeline("orders", 2).state_key
    for name in ("v1", "v2-shuffle"):
        assert variant_unavailable(PROCESSOR_VARIANTS[name]) is None, name
    assert "state_key" in (variant_unavailable(PROCESSOR_VARIANTS["v2"]) or "")


def test_a_variant_with_an_unknown_processor_argument_is_skipped() -> None:
    variant = ProcessorVariant("x", "x", "orders", 2, kwargs={"no_such_argument": 1})
    assert "no_such_argument" in (variant_unavailable(variant) or "")
    with pytest.raises(ValueError, match="unknown variant condition"):
        variant_unavailable(ProcessorVariant("y", "y", "orders", 2, needs=("bogus:thing",)))


def test_compare_windows_finds_every_kind_of_difference() -> None:
    ours = [[0, "purchase", 2, 10.0], [60_000, "refund", 1, -5.0]]
    assert compare_windows(ours, [[0, "purchase", 2, 10.0 + 1e-9], [60_000, "refund", 1, -5.0]])["equal"]
    assert compare_windows(ours, [[0, "purchase", 2, 10.0]])["keys_differ"] == 1
    assert compare_windows(ours, [[0, "purchase", 3, 10.0], [60_000, "refund", 1, -5.0]])["counts_differ"] == 1
    assert compare_windows(ours, [[0, "purchase", 2, 10.5], [60_000, "refund", 1, -5.0]])["amounts_differ"] == 1
    assert not compare_windows([], [])["equal"]


def test_verdict_passes_only_when_every_check_is_met() -> None:
    good = report.verdict(results())
    assert good["passed"] and good["complete"] and good["checks"] == good["checks_met"] > 0
    for bad, missed in ((results(v1_vs_cp=0.4), "processor v1 vs ConsumerPerformance"),
                        (results(v1_vs_quix=4.0), "processor v1 vs Quix Streams (best)"),
                        (results(totals_equal=False), "per-(window, type) totals: v1 == Quix best"),
                        (results(loader_rss_ratio=1.3), "loader (bounded)")):
        verdict = report.verdict(bad)
        assert not verdict["passed"] and any(missed in name for name in verdict["missed"])


def test_verdict_is_incomplete_below_10m_from_a_quick_run_or_mixed_commits() -> None:
    assert report.verdict(results(largest=3_000_000))["missing"] == ["memory at 10M events"]
    assert report.verdict(results(quick=True))["quick_sections"] == ["archiver", "load"]
    mixed = results()
    mixed["scenarios"]["memory"]["provenance"] = provenance(commit="def5678")
    assert not report.verdict(mixed)["complete"]


def test_merge_keeps_the_sections_a_run_did_not_measure() -> None:
    old = results()
    old["scenarios"]["e2e"] = {"records": 1}  # an older format without provenance is dropped
    new = {"meta": {}, "scenarios": {"memory": {"provenance": provenance(commit="def5678")}}}
    merged = report.merge(old, new)
    assert merged["scenarios"]["memory"]["provenance"]["commit"] == "def5678"
    assert {"archiver", "load", "processor"} <= set(merged["scenarios"]) and "e2e" not in merged["scenarios"]


def test_a_memory_run_merged_onto_a_bench_run_keeps_the_bench_minutes_check() -> None:
    """`make bench-memory` after `make bench`: the merged results still check `make bench`'s duration."""
    old = results()
    old["meta"].update(duration_s=1500.0, config={"scenarios": ["archiver", "load", "processor"], "quick": False})
    minutes = "`make bench` minutes"
    assert minutes in report.verdict(old)["missed"]  # 25 minutes: over the target
    new = {"meta": {"duration_s": 600.0, "config": {"scenarios": ["memory"], "quick": False}},
           "scenarios": {"memory": old["scenarios"].pop("memory")}}
    merged = report.merge(old, new)
    assert merged["meta"]["bench_run"]["duration_s"] == 1500.0
    assert minutes in report.verdict(merged)["missed"]
    alone = {"meta": {"duration_s": 600.0, "config": {"scenarios": ["memory"]}}, "scenarios": new["scenarios"]}
    assert all(c["name"] != minutes for c in report.checks(alone))  # a memory run alone has no bench duration


def test_report_and_chart_render_from_results(tmp_path: Path) -> None:
    data = results()
    text = report.markdown(data)
    assert "**Result: PASSED**" in text and "skipped: not available at this commit" in text
    ceiling = next(line for line in text.splitlines() if line.startswith("| 2c. Ceiling"))
    assert "Quix Streams (best)" in ceiling and "**8.00**" in ceiling and ceiling.endswith("| - | info |")
    pytest.importorskip("matplotlib")
    json_path, md_path, png = report.write(data, tmp_path)
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "latest.png" in md_path.read_text() and json_path.exists()


def test_bad_cli_names_fail_with_the_choices() -> None:
    with pytest.raises(SystemExit):
        cli.parse(["--processor-variants", "v9"])
    assert cli.parse(["--quick"]).label.startswith("QUICK VALIDATION RUN")
    assert cli.parse(["--quix-modes", ""]).quix_modes == []
