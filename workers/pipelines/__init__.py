"""Pipeline registry: ``get_pipeline("orders", 2)`` -> an ``OrdersV2`` instance.

Users add pipelines without touching the engine: ``@register`` in an imported module, an entry
point ``kappa.pipelines``, or ``KAPPA_PIPELINE_MODULES`` (see docs/ARCHITECTURE.md, "Writing a new pipeline").
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points

from workers.errors import KappaError
from workers.pipelines.base import Pipeline, check_window
from workers.pipelines.orders import OrdersV1, OrdersV2

ENTRY_POINT_GROUP = "kappa.pipelines"
MODULES_ENV = "KAPPA_PIPELINE_MODULES"
_REGISTRY: dict[tuple[str, int], type[Pipeline]] = {}
_plugins_loaded = False


def register(cls: type[Pipeline]) -> type[Pipeline]:
    """Class decorator: make ``(cls.name, cls.version)`` available to the processor and the CLI."""
    key = (cls.name, cls.version)
    check_window(cls)
    if key in _REGISTRY and _REGISTRY[key] is not cls:
        raise KappaError(f"pipeline {cls.name} v{cls.version} is registered twice")
    _REGISTRY[key] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            entry.load()
        for module in filter(None, (m.strip() for m in os.environ.get(MODULES_ENV, "").split(","))):
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise KappaError(f"{MODULES_ENV} names {module!r}, which cannot be imported: {exc}") from None


def known() -> list[tuple[str, int]]:
    """Every registered ``(name, version)``, sorted."""
    _load_plugins()
    return sorted(_REGISTRY)


def get_pipeline(name: str, version: int) -> Pipeline:
    """The pipeline instance, or a one-line error listing the known ones."""
    _load_plugins()
    cls = _REGISTRY.get((name, version))
    if cls is None:
        listing = ", ".join(f"{n} v{v}" for n, v in known())
        if any(n == name for n, _ in _REGISTRY):
            raise KappaError(f"pipeline {name!r} has no version {version}; known pipelines: {listing}")
        raise KappaError(f"unknown pipeline {name!r}; known pipelines: {listing}")
    check_window(cls)  # also a window changed after registration
    return cls()


for _builtin in (OrdersV1, OrdersV2):
    register(_builtin)

__all__ = ["Pipeline", "get_pipeline", "known", "register"]
