"""Statistics, tables and pages from a results table handed in (a pyarrow Table, a DataFrame or a list of dicts).

Imports neither `workers` nor `orchestrator`. Names load their modules (scipy, pandas, pyarrow, rich) on first
use, so that importing the package, and `ablate --help`, stays instant.
"""
# How comparisons are analysed unless asked otherwise: every Ablate grid gives seed s to every variant
# (common random numbers), so paired by seed. The one switch, should measurements on real grids say so.
DESIGNS = ("paired", "welch")
DEFAULT_DESIGN = "paired"

_LAZY = {"compare": "stats", "summary": "stats", "results_to_arrow": "stats", "FORMATS": "tables",
         "document": "tables", "render": "tables", "write": "tables", "print_table": "tables",
         "render_report": "report"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DESIGNS", "DEFAULT_DESIGN", *_LAZY]
