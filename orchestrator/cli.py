"""The `ablate` command line.

Contract (../shared/CONTRACT.md): every command takes `--json` and then prints exactly one JSON document
on standard output (progress and logs go to standard error); exit 0 on success, 2 on bad input with a
one-line reason. Heavy libraries load inside the commands so that `ablate --help` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from ablations.spec import BLOCKS, DATASET_SHAPES, SHORTCUTS, UNITS, VARIANTS


class UsageError(ValueError):
    """Bad input found by the CLI itself; reported like any other bad input (exit 2)."""


def _bad_input_types() -> tuple[type[BaseException], ...]:
    """Every error class that means 'the user asked for something invalid' (exit 2, one line)."""
    from ablations.spec import SpecError
    types: list[type[BaseException]] = [UsageError, SpecError]
    try:
        from workers.data import DataError
        types.append(DataError)
    except ImportError:
        pass
    try:
        from workers.recipes import RecipeError
        types.append(RecipeError)
    except ImportError:
        pass
    return tuple(types)


# ----------------------------------------------------------------------------------------------- options
def add_model_options(p: argparse.ArgumentParser, depth_required: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--variant", choices=sorted(VARIANTS), metavar="NAME",
                   help="start from a catalogue variant (see `ablate models`); other options override it")
    g.add_argument("--depth", type=int, required=depth_required, help="6n+2 (basic) or 9n+2 (bottleneck)")
    g.add_argument("--block", choices=BLOCKS)
    g.add_argument("--width", type=int, help="stem width (default 16)")
    g.add_argument("--unit", metavar="U", help=f"activation placement: {', '.join(UNITS)}")
    g.add_argument("--shortcut", metavar="S", help=f"shortcut: {', '.join(SHORTCUTS)}")
    g.add_argument("--shortcut-scale", type=float, help="λ on the shortcut (shortcut=scale)")
    g.add_argument("--residual-scale", type=float, help="scale on F (shortcut=scale)")
    g.add_argument("--gate-bias", type=float, help="initial gate bias b_g (gated shortcuts)")
    g.add_argument("--dropout", type=float, help="drop ratio on the shortcut (shortcut=dropout)")
    g.add_argument("--downsample", choices=("A", "B"), help="A: zero-padded identity, B: 1×1 projection")
    g.add_argument("--dataset", choices=tuple(DATASET_SHAPES), default="cifar10")


MODEL_OPTIONS = ("depth", "block", "width", "unit", "shortcut", "shortcut_scale", "residual_scale", "gate_bias",
                 "dropout", "downsample")


def model_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The model spec fields the user gave (unset options stay unset, so defaults stay the spec's)."""
    from ablations.spec import variant_fields
    fields = variant_fields(args.variant) if args.variant else {}
    fields.update({k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k) is not None})
    channels, _, classes = DATASET_SHAPES[args.dataset]
    fields.update(in_channels=channels, num_classes=classes)
    return fields


# ---------------------------------------------------------------------------------------------- commands
def cmd_models(args: argparse.Namespace) -> Any:
    from ablations.spec import FIGURES, PAPER_DEPTHS, make_spec
    if args.depth is None:
        if any(getattr(args, k) is not None for k in MODEL_OPTIONS) or args.variant:
            raise UsageError("model options describe one network: give --depth too")
        return {"units": list(UNITS), "shortcuts": list(SHORTCUTS), "blocks": list(BLOCKS),
                "paper_depths": {str(d): b for d, b in PAPER_DEPTHS.items()}, "datasets": list(DATASET_SHAPES),
                "variants": [{"name": n, "figure": FIGURES.get(n), **f} for n, f in VARIANTS.items()]}
    from torch import nn
    from ablations import build_model, count_macs, count_params
    spec = make_spec(**model_fields(args))
    model = build_model(spec)
    # The paper's "1.7M" and "10.2M" count convolutions and the classifier, not BN's affine weights.
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    params = count_params(model)
    return {**spec.model_dump(), "dataset": args.dataset, "variant": args.variant, "units": 3 * spec.n,
            "params": params, "params_without_bn": params - bn,
            "macs": count_macs(model, DATASET_SHAPES[args.dataset][1])}


def cmd_probe(args: argparse.Namespace) -> Any:
    import torch
    from ablations import build_model, make_spec, probe_propagation
    if args.batch < 2:
        raise UsageError(f"--batch must be at least 2 (batch statistics), got {args.batch}")
    spec = make_spec(**model_fields(args))
    torch.manual_seed(args.seed)
    model = build_model(spec)
    channels, size, classes = DATASET_SHAPES[args.dataset]
    # Standard-normal images of the dataset's shape and uniform labels: the probe needs no data files,
    # and with BN in training mode the first units see normalised activations either way.
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, channels, size, size, generator=gen)
    y = torch.randint(0, classes, (args.batch,), generator=gen)
    return {**spec.model_dump(), "dataset": args.dataset, "seed": args.seed, **probe_propagation(model, x, y)}


# ----------------------------------------------------------------------------------------------- printing
def print_human(name: str, result: Any) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console()
    if name == "models" and "variants" in result:
        table = Table(title="Variant catalogue (use a name in a grid, or --variant)")
        for col in ("name", "figure", "fields"):
            table.add_column(col)
        for v in result["variants"]:
            fields = ", ".join(f"{k}={val}" for k, val in v.items() if k not in ("name", "figure"))
            table.add_row(v["name"], v["figure"] or "", fields)
        console.print(table)
        console.print(f"units: {', '.join(result['units'])}\nshortcuts: {', '.join(result['shortcuts'])}\n"
                      f"paper depths: {', '.join(f'{d} ({b})' for d, b in result['paper_depths'].items())}")
    elif name == "probe":
        table = Table(title=f"ResNet-{result['depth']} {result['unit']} / {result['shortcut']}: propagation at init")
        for col in ("unit", "stage", "‖x_l‖", "‖∂E/∂x_l‖", "h'", "mean 1-g"):
            table.add_column(col, justify="right")
        for u in result["units"]:
            table.add_row(str(u["unit"]), str(u["stage"]), f"{u['x_norm']:.4g}", f"{u['grad_norm']:.4g}",
                          "" if u["shortcut_gain"] is None else f"{u['shortcut_gain']:g}",
                          "" if u["gate_mean"] is None else f"{u['gate_mean']:.4f}")
        console.print(table)
        console.print(f"grad_ratio_first_last = {result['grad_ratio_first_last']:.4g}; "
                      f"shortcut_factor Π h' = {result['shortcut_factor']}")
    elif isinstance(result, dict):
        width = max(map(len, result)) if result else 0
        for k, v in result.items():
            console.print(f"{k:<{width}}  {v}", highlight=False)
    else:
        console.print(result)


# ------------------------------------------------------------------------------------------------- parser
COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {"models": cmd_models, "probe": cmd_probe}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ablate", description="Residual-unit ablations on Ray, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON document on standard output")
        return p

    add_model_options(command("models", "the variant catalogue, or one model's parameters and MACs"))
    p = command("probe", "signal and gradient propagation at initialisation (Eqn. 5-8)")
    add_model_options(p, depth_required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = COMMANDS[args.command](args)
    except _bad_input_types() as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if args.json:
            print(json.dumps({"error": message}))
        print(f"ablate {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ablate {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print_human(args.command, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
