"""docs/RELIABILITY.md shows figures of green runs only; anything else reads "not measured in this run"."""

from __future__ import annotations

import json
from pathlib import Path

from .invariants import Figures
from .render_doc import NOT_MEASURED, render


def figures_json(path: Path, green: bool) -> str:
    figures = Figures()
    figures.current_test = "tests/reliability/test_process_faults.py::test_archiver"
    figures.fault("sigkill.archiver", 4)
    figures.count("records_checked", 123_457)
    figures.count("archive_overlap_rows", 3)
    run = {"commit": "0123456789abcdef", "uncommitted_changes": False, "date": "2026-12-01T22:00:00+00:00",
           "command": "pytest -m 'not soak' tests/reliability", "exitstatus": 0 if green else 1, "green": green,
           "passed": 50, "failed": 0 if green else 3, "errors": 0, "skipped": 0, "seconds": 400, "tests": {}}
    path.write_text(json.dumps({"run": run, **figures.as_json()}))
    return str(path)


def test_a_green_run_is_shown_and_the_rest_is_not_measured(tmp_path: Path) -> None:
    doc = render(figures_json(tmp_path / "green.json", True), str(tmp_path / "missing.json"))
    assert "| kill -9 of the archiver (kills that landed mid-work) | **4** | " + NOT_MEASURED in doc
    assert "123,457" in doc and "commit `0123456789ab`" in doc and "**50 passed**" in doc
    assert f"| zombie rounds (SIGSTOP past the session timeout, takeover, SIGCONT) | {NOT_MEASURED} |" in doc
    assert "{{FIGURES}}" not in doc


def test_a_run_that_was_not_green_gives_no_figures(tmp_path: Path) -> None:
    doc = render(figures_json(tmp_path / "red.json", False), str(tmp_path / "missing.json"))
    assert "123,457" not in doc and "**4**" not in doc and "50 passed" not in doc
    assert "no green run recorded" in doc
