"""Packaging: a worker host installs `.[workers]` without Dagster, and `make install` still gets everything."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
#: Imported lazily by a dev tool that says which extra to install when it is missing.
DEV_ONLY_IMPORTS = {"playwright"}
#: The packages the design card requires in the default (`make install`) environment.
DESIGN_CARD = {"dagster", "dagster-aws", "confluent-kafka", "polars", "boto3", "pytest"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _closure(extra: str) -> set[str]:
    """Distribution names an extra installs, following `kappa-dagster[...]` self-references."""
    names: set[str] = set(map(_name, PROJECT["dependencies"]))
    for requirement in EXTRAS[extra]:
        if _name(requirement) == PROJECT["name"]:
            inner = requirement[requirement.index("[") + 1 : requirement.index("]")]
            for other in inner.split(","):
                names |= _closure(other.strip())
        else:
            names.add(_name(requirement))
    return names


def _third_party_imports(package: Path) -> set[str]:
    found: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return {name for name in found if name not in sys.stdlib_module_names and name != "__future__"}


def _undeclared(package: str, extra: str) -> dict[str, list[str]]:
    """Third-party modules ``package`` imports whose distribution ``extra`` does not install."""
    installed, providers = _closure(extra), importlib.metadata.packages_distributions()
    missing = {}
    for module in _third_party_imports(ROOT / package) - DEV_ONLY_IMPORTS - {"workers", "kappa_dagster"}:
        dists = {_name(d) for d in providers.get(module, [module])}
        if not dists & installed:
            missing[module] = sorted(dists)
    return missing


def test_the_workers_extra_has_no_dagster_but_every_import_of_workers() -> None:
    workers = _closure("workers")
    assert not {name for name in workers if name.startswith("dagster") and name != "dagster-pipes"}, workers
    assert not _undeclared("workers", "workers")


def test_the_dagster_extra_has_every_import_of_the_code_location() -> None:
    assert not _undeclared("kappa_dagster", "dagster")


def test_make_install_gets_every_package_of_the_design_card() -> None:
    assert _closure("dev") >= DESIGN_CARD
    assert {"dagster", "dagster-webserver", "dagster-aws"} <= _closure("dagster")


def test_importing_every_worker_module_loads_no_dagster() -> None:
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for path in (ROOT / "workers").rglob("*.py")
        if path.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0].startswith('dagster') and m != 'dagster_pipes'))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"workers/ imported Dagster: {done.stdout}"
