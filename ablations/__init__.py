"""The residual-unit zoo of He et al. 2016: specs, variants, networks and propagation probes.

Imports nothing from the other Ablate packages. Names that need torch load on first use, so that
reading specs (and `ablate --help`) stays instant.
"""
from .spec import BLOCKS, PAPER_DEPTHS, SHORTCUTS, UNITS, VARIANTS, ModelSpec, SpecError, make_spec, variant_fields
from .vocabulary import DATASET_SHAPES

_LAZY = {"probe_propagation": "probe", "ResNet": "resnet", "build_model": "resnet", "count_macs": "resnet",
         "count_params": "resnet"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BLOCKS", "DATASET_SHAPES", "PAPER_DEPTHS", "SHORTCUTS", "UNITS", "VARIANTS", "ModelSpec", "SpecError",
           "make_spec", "variant_fields", *_LAZY]
