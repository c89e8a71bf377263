"""Statistics, tables and pages from a results table handed in (a pyarrow Table, a DataFrame or a list of dicts).

Imports neither `workers` nor `orchestrator`. Names load their modules (scipy, pandas, pyarrow, rich) on first
use, so that importing the package, and `ablate --help`, stays instant.
"""
# How comparisons are analysed unless asked otherwise. Every Ablate grid gives seed s to every variant
# (common random numbers), so a paired analysis is valid; measured on real runs it gains nothing: 8 seeds of
# ResNet-20 on Fashion-MNIST (ablations/examples/mini-tables.yaml), per-seed correlation with the baseline
# +0.12 (bn_after_add), -0.02 (full_preact), -0.28 (scale-0.5), var(d) / (var1 + var2) 0.91, 1.01, 1.22.
# Training is chaotic: shared initial weights and data order do not carry to the final error. With no
# correlation to remove, the paired t-test only halves the degrees of freedom, so Welch is the default.
DESIGNS = ("paired", "welch")
DEFAULT_DESIGN = "welch"

_LAZY = {"compare": "stats", "summary": "stats", "results_to_arrow": "stats", "FORMATS": "tables",
         "document": "tables", "render": "tables", "write": "tables", "print_table": "tables",
         "render_report": "report"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DESIGNS", "DEFAULT_DESIGN", *_LAZY]
