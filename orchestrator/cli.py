"""The `ablate` command line.

Contract (../shared/CONTRACT.md): every command takes `--json` and then prints exactly one JSON document
on standard output (progress and logs go to standard error); exit 0 on success, 2 on bad input with a
one-line reason. Heavy libraries load inside the commands so that `ablate --help` is instant.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from ablations.spec import BLOCKS, SHORTCUTS, UNITS, VARIANTS, excerpt
from ablations.vocabulary import DATASET_SHAPES, MEASURED, METRICS, STATUSES, first_line
from dashboards import DEFAULT_DESIGN, DESIGNS
from .cluster import ClusterError


class UsageError(ValueError):
    """Bad input found by the CLI itself; reported like any other bad input (exit 2)."""


def _bad_input_types() -> tuple[type[BaseException], ...]:
    """Every error class that means 'the user asked for something invalid' (exit 2, one line)."""
    from pydantic import ValidationError
    from ablations.spec import SpecError
    from .grids import GridError
    types: list[type[BaseException]] = [UsageError, SpecError, ValidationError, GridError]
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


def one_line(exc: BaseException) -> str:
    """The reason for a bad input, in one line (pydantic's errors name the field and the value)."""
    from pydantic import ValidationError
    from ablations.spec import validation_reason
    if isinstance(exc, ValidationError):
        return validation_reason(exc, "input")
    return first_line(exc)


# ----------------------------------------------------------------------------------------------- options
def add_model_options(p: argparse.ArgumentParser, depth_required: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--variant", choices=sorted(VARIANTS), metavar="NAME",
                   help="start from a catalogue variant (see `ablate models`); other options override it")
    g.add_argument("--depth", type=int, required=depth_required,
                   help="6n+2 (basic), 9n+2 (bottleneck) or 3n+2 (single); on imagenet 18, 34, 50, 101, 152, 200")
    g.add_argument("--block", choices=BLOCKS)
    g.add_argument("--width", type=int, help="stem width (default 16; 64 on imagenet)")
    g.add_argument("--unit", metavar="U", help=f"activation placement: {', '.join(UNITS)}")
    g.add_argument("--shortcut", metavar="S", help=f"shortcut: {', '.join(SHORTCUTS)}")
    g.add_argument("--shortcut-scale", type=float, help="λ on the shortcut (shortcut=scale)")
    g.add_argument("--residual-scale", type=float, help="scale on F (shortcut=scale)")
    g.add_argument("--gate-bias", type=float, help="initial gate bias b_g (gated shortcuts)")
    g.add_argument("--dropout", type=float, help="drop ratio on the shortcut (shortcut=dropout)")
    g.add_argument("--downsample", choices=("A", "B"), help="A: zero-padded identity, B: 1×1 projection")
    g.add_argument("--dataset", choices=tuple(DATASET_SHAPES), default="cifar10",
                   help="also picks the input shape, the classes and the stem and stages (imagenet)")


MODEL_OPTIONS = ("depth", "block", "width", "unit", "shortcut", "shortcut_scale", "residual_scale", "gate_bias",
                 "dropout", "downsample")


def model_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The model spec fields the user gave (unset options stay unset, so defaults stay the spec's), and
    those the dataset decides."""
    from ablations.spec import dataset_model_fields, variant_fields
    fields = variant_fields(args.variant) if args.variant else {}
    fields.update({k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k) is not None})
    fields.update(dataset_model_fields(args.dataset))
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
    return {**spec.model_dump(), "plan": spec.plan, "dataset": args.dataset, "variant": args.variant,
            "stages": list(spec.stages), "units": sum(spec.stages),
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


def recipe_overrides(args: argparse.Namespace):
    """The recipe named by --recipe with --set FIELD=VALUE on top (epochs counted over the dataset's training
    set, or --subset); --iterations K is `--set iterations=K` (the schedule stretched to K iterations, as
    `iterations` in a grid's recipe)."""
    from workers.recipes import parse_override, resolve_recipe, training_size
    overrides = dict(parse_override(item) for item in args.set)
    if args.iterations:
        overrides["iterations"] = args.iterations
    return resolve_recipe(args.recipe, overrides, train_size=training_size(args.dataset, args.subset))


def cmd_train(args: argparse.Namespace) -> Any:
    from ablations.vocabulary import check_data_dir
    if args.iterations is not None and args.iterations < 1:
        raise UsageError(f"--iterations must be positive, got {args.iterations}")
    if args.data_dir is not None:
        try:
            check_data_dir(args.data_dir)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    from workers.checkpoint import CheckpointError
    from workers.launch import LaunchError, run_workers
    from workers.sinks import JsonLinesSink
    from workers.trainer import run_trial, trial_config
    if args.workers < 1:
        raise UsageError(f"--workers must be positive, got {args.workers}")
    fields = {k: v for k, v in model_fields(args).items() if k not in ("in_channels", "num_classes", "plan")}
    config = trial_config(fields, args.dataset, recipe_overrides(args), args.seed, subset=args.subset,
                          workers=args.workers)
    try:
        if args.workers > 1:
            result = run_workers(config, checkpoint_dir=args.checkpoint_dir, threads=args.threads, device=args.device,
                                 data_dir=args.data_dir, log=True)
        else:
            result = run_trial(config, checkpoint_dir=args.checkpoint_dir, sink=JsonLinesSink(sys.stderr),
                               threads=args.threads, device=args.device, data_dir=args.data_dir)
    except (CheckpointError, LaunchError) as exc:
        raise UsageError(str(exc)) from None
    return {k: v for k, v in result.items() if k != "history"}


def _store():
    from .state import StateStore
    return StateStore()


def _find_grid(store, ref: str):
    row = store.find_grid(ref)
    if row is None:
        raise UsageError(f"no grid {excerpt(ref)} in {store.url}; `ablate status` lists the grids")
    return row


def comparison(store, grid_id: str, metric: str = "test_error", baseline: str | None = None,
               design: str = DEFAULT_DESIGN) -> dict[str, Any]:
    from .results import BadRequest, comparison as compute
    try:
        return compute(store, grid_id, metric, baseline, design)
    except BadRequest as exc:
        raise UsageError(str(exc)) from None


def cmd_run(args: argparse.Namespace) -> Any:
    from .grids import load_grid
    from .scheduler import GridInterrupted, GridRunner
    from .tracking import ui_command
    spec = load_grid(args.grid)
    if not args.until_decided and any(v is not None for v in (args.max_seeds, args.batch, args.margin)):
        raise UsageError("--max-seeds, --batch and --margin go with --until-decided")
    store = _store()
    runner = GridRunner(store=store, progress=True)
    try:
        if args.until_decided:
            from .adaptive import PlanError, run_until_decided
            try:
                out = run_until_decided(runner, spec, args.max_seeds, args.batch, args.margin)
            except PlanError as exc:
                raise UsageError(str(exc)) from None
        else:
            out = runner.run(spec)
    except GridInterrupted as exc:
        print(f"interrupted: the grid stays resumable; run `ablate run {args.grid}` again", file=sys.stderr)
        raise SystemExit(130) from exc
    out["comparison"] = comparison(store, out["grid"])
    print(f"MLflow: {ui_command(out['tracking_uri'], out.get('mlflow_experiment_id'))}", file=sys.stderr)
    ended_well = sum(out["counts"][s] for s in MEASURED) == out["trials"]
    out["exit_code"] = 0 if ended_well else 1
    return out


DEFAULT_SERVER = "http://127.0.0.1:8600"


def http(args: argparse.Namespace, method: str, path: str, body: bytes | None = None,
         content_type: str = "application/yaml") -> Any:
    """Call the service at --server (or $ABLATE_SERVER); 4xx answers become one-line CLI errors."""
    import os
    import urllib.error
    import urllib.request
    base = (args.server or os.environ.get("ABLATE_SERVER") or DEFAULT_SERVER).rstrip("/")
    request = urllib.request.Request(f"{base}{path}", data=body, method=method)
    if body is not None:
        request.add_header("Content-Type", content_type)
    if os.environ.get("ABLATE_TOKEN"):
        request.add_header("Authorization", f"Bearer {os.environ['ABLATE_TOKEN']}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail")
        except ValueError:
            detail = exc.reason
        raise UsageError(f"server answered {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise UsageError(f"cannot reach the Ablate service at {base}: {exc.reason}") from None


def _quote(segment: str) -> str:
    import urllib.parse
    return urllib.parse.quote(segment, safe="")


def cmd_submit(args: argparse.Namespace) -> Any:
    from .grids import load_grid
    spec = load_grid(args.grid)  # validate here: a bad file fails before any network call
    return http(args, "POST", "/grids", json.dumps(spec.model_dump(mode="json", by_alias=True,
                                                                    exclude_none=True)).encode(),
                "application/json")


def checked_mlflow_url(args: argparse.Namespace) -> str | None:
    """--mlflow-url, checked before any work: pages link to runs under it."""
    from dashboards.pages import check_link_base
    try:
        return None if args.mlflow_url is None else check_link_base(args.mlflow_url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> Any:
    import ipaddress
    import os
    checked_mlflow_url(args)
    import uvicorn
    from .api import create_app
    from .service import GridService
    token = os.environ.get("ABLATE_TOKEN") or None
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        raise UsageError(f"--host must be an IP address or localhost, got {excerpt(args.host)}") from None
    if not loopback and token is None:
        raise UsageError(f"refusing to serve on {args.host} without ABLATE_TOKEN: anyone on the network could "
                         f"submit work; set ABLATE_TOKEN (clients send it as a bearer token)")
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must lie in 1..65535, got {args.port}")
    service = GridService()
    service.start()
    print(f"ablate serve: http://{args.host}:{args.port}/ (state {service.store.url}, MLflow {service.tracker.uri})",
          file=sys.stderr)
    uvicorn.run(create_app(service, token=token, mlflow_url=args.mlflow_url), host=args.host, port=args.port,
                log_level="warning")
    service.stop()
    return {"stopped": True}


def cmd_status(args: argparse.Namespace) -> Any:
    if args.server:
        return http(args, "GET", f"/grids/{_quote(args.grid)}") if args.grid else {"grids": http(args, "GET", "/grids")}
    store = _store()
    if args.grid is None:
        return {"grids": [{"id": g.id, "name": g.name, "grid_cancelled": g.cancelled, **store.counts(g.id)}
                          for g in store.grids()]}
    from .results import grid_status
    return grid_status(store, _find_grid(store, args.grid).id)


def cmd_cancel(args: argparse.Namespace) -> Any:
    if args.server:
        return http(args, "DELETE", f"/grids/{_quote(args.grid)}")
    store = _store()
    row = _find_grid(store, args.grid)
    return {"grid": row.id, "cancelled_queued": store.cancel_grid(row.id), **store.counts(row.id)}


def cmd_data(args: argparse.Namespace) -> Any:
    from workers.fetch import fetch_dataset
    out = fetch_dataset(args.dataset, args.dir)
    print(f"{args.dataset}: {'downloaded into' if out['downloaded'] else 'already in'} {out['folder']}; "
          f"runs read it with {out['use']} (or a grid's data_dir)", file=sys.stderr)
    return out


def cmd_grids(args: argparse.Namespace) -> Any:
    from ablations.paper import GRIDS
    from .grids import expand_grid, load_grid
    out = []
    for name in GRIDS:
        spec = load_grid(name)
        out.append({"name": name, "dataset": spec.dataset, "depths": spec.depths, "variants": spec.variant_names(),
                    "seeds": len(spec.seed_list), "recipe": spec.recipe, "trials": len(expand_grid(spec))})
    return {"grids": out}


def cmd_compare(args: argparse.Namespace) -> Any:
    """`--format F` is F wherever it goes: standard output, or FILE with `-o` (then `{"written": FILE}` is the
    result). `--json` without `-o` prints the document whatever the format, as every command's `--json`."""
    from dashboards.tables import FORMATS, render, write
    if args.format not in FORMATS:
        raise UsageError(f"unknown format {excerpt(args.format)}; choose one of: {', '.join(FORMATS)}")
    if args.format == "parquet" and not args.output and (args.json or sys.stdout.isatty()):
        raise UsageError("--format parquet needs -o FILE (or standard output redirected, without --json)")
    if args.server:
        import urllib.parse
        query = urllib.parse.urlencode({"metric": args.metric, "design": args.design,
                                        **({"baseline": args.baseline} if args.baseline else {})})
        doc = http(args, "GET", f"/grids/{_quote(args.grid)}/comparison?{query}")
    else:
        store = _store()
        doc = comparison(store, _find_grid(store, args.grid).id, args.metric, args.baseline, args.design)
    if args.output:
        write(doc, args.format, args.output)
        return {"written": args.output}
    if args.json:
        return doc
    return Rendered(render(doc, args.format))


def cmd_plan(args: argparse.Namespace) -> Any:
    from .results import BadRequest, seed_plan
    if args.server:
        import urllib.parse
        query = urllib.parse.urlencode({"delta": args.delta, "power": args.power, "alpha": args.alpha,
                                        **({"baseline": args.baseline} if args.baseline else {})})
        return http(args, "GET", f"/grids/{_quote(args.grid)}/plan?{query}")
    store = _store()
    try:
        return seed_plan(store, _find_grid(store, args.grid).id, args.delta, args.power, args.alpha, args.baseline)
    except BadRequest as exc:
        raise UsageError(str(exc)) from None


def cmd_report(args: argparse.Namespace) -> Any:
    from .reporting import grid_report
    mlflow_url = checked_mlflow_url(args)
    store = _store()
    row = _find_grid(store, args.grid)
    target = Path(args.output or f"{row.id}.html")
    target.write_text(grid_report(store, row.id, mlflow_url))
    return {"grid": row.id, "written": str(target)}


def cmd_tune(args: argparse.Namespace) -> Any:
    from .tracking import ui_command
    from .tuning import StudyInterrupted, TuneError, run_study
    try:
        out = run_study(args.spec)
    except TuneError as exc:
        raise UsageError(str(exc)) from None
    except StudyInterrupted as exc:
        print(f"interrupted: the study stays resumable; run `ablate tune {args.spec}` again", file=sys.stderr)
        raise SystemExit(130) from exc
    print(f"MLflow: {ui_command(out['tracking_uri'])}", file=sys.stderr)
    if out["tuned_recipe"]:
        print(f"use it in a grid as `recipe: {out['tuned_recipe']}`", file=sys.stderr)
    # Like `run`: 1 when crashed trials left the study short of n_trials (a rerun tops it up).
    out["exit_code"] = 0 if out["n_complete"] + out["n_pruned"] >= out["n_trials"] else 1
    return out


class Rendered:
    """Already formatted output: printed as it is (text, or bytes for a binary format)."""

    def __init__(self, content: str | bytes):
        self.content = content


# ----------------------------------------------------------------------------------------------- printing
def print_plan(plan: dict[str, Any], console) -> None:
    from rich.table import Table

    def text(x: Any, fmt: str = "") -> str:
        return "–" if x is None else f"{x:{fmt}}"

    table = Table(title=f"{plan['grid']}: seeds to decide Δ = {plan['delta']:g} points with power {plan['power']:g} "
                        f"(paired t at α/{plan['comparisons']} = {plan['alpha_per_comparison']:.3g})",
                  title_justify="left")
    for i, h in enumerate(("setting", "variant", "pairs", "SD(d)", "seeds", "--until-decided max", "more",
                           "trial-hours")):
        table.add_column(h, justify="left" if i < 2 else "right")
    for r in plan["rows"]:
        table.add_row(f"{r['setting']['dataset']} ResNet-{r['setting']['depth']}", r["variant"], str(r["pairs"]),
                      text(r["sd_diff"], ".3f"), text(r["seeds"]) if r["reason"] is None else r["reason"],
                      text(r["max_seeds"]), text(r["more_seeds"]), text(r["trial_hours"], ".2f"))
    console.print(table)
    console.print(f"total: {text(plan['total_trial_hours'], '.2f')} trial-hours (each setting's baseline counted "
                  f"once); --until-decided needs {plan['sequential_inflation']:.2f}× the seeds at its last look",
                  highlight=False)


def print_human(name: str, result: Any) -> None:
    from rich.console import Console
    from rich.table import Table
    # A file or a pipe gets the whole table, not rich's 80-column default.
    console = Console() if sys.stdout.isatty() else Console(width=220)
    if name == "submit":
        print(result["id"])
    elif isinstance(result, Rendered):
        if isinstance(result.content, bytes):
            sys.stdout.flush()
            sys.stdout.buffer.write(result.content)
        else:
            sys.stdout.write(result.content if result.content.endswith("\n") else result.content + "\n")
    elif name == "plan":
        print_plan(result, console)
    elif name == "run":
        from dashboards.tables import print_table
        print_table(result["comparison"], console)
        console.print(f"grid {result['grid']}: {result['trials']} trials, {result['executed']} trained now, "
                      f"{result['reused']} reused; {result['counts']}", highlight=False)
    elif name == "grids":
        table = Table(title="Bundled grids (ablate run NAME; ablate compare NAME)")
        for col in ("name", "dataset", "depths", "variants", "seeds", "recipe", "trials"):
            table.add_column(col, justify="right" if col in ("seeds", "trials") else "left")
        for g in result["grids"]:
            recipe = g["recipe"] if isinstance(g["recipe"], str) else ", ".join(f"{k}={v}" for k, v in g["recipe"].items())
            dataset = g["dataset"] if isinstance(g["dataset"], str) else ", ".join(g["dataset"])
            table.add_row(g["name"], dataset, ", ".join(map(str, g["depths"])), ", ".join(g["variants"]),
                          str(g["seeds"]), recipe, str(g["trials"]))
        console.print(table)
    elif name == "status" and "grids" in result:
        table = Table(title="Grids")
        columns = ("name", "grid", *STATUSES)
        for col in columns:
            table.add_column(col, justify="left" if col in ("name", "grid") else "right")
        for g in result["grids"]:
            name_cell = g["name"] + (" (cancelled)" if g.get("grid_cancelled") else "")
            table.add_row(name_cell, g["id"], *(str(g.get(k, 0)) for k in STATUSES))
        console.print(table)
    elif name == "models" and "variants" in result:
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
COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "models": cmd_models, "probe": cmd_probe, "train": cmd_train, "run": cmd_run, "status": cmd_status,
    "cancel": cmd_cancel, "grids": cmd_grids, "compare": cmd_compare, "submit": cmd_submit, "serve": cmd_serve,
    "report": cmd_report, "tune": cmd_tune, "plan": cmd_plan, "data": cmd_data}


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

    p = command("train", "one trial inline, no Ray; resumes from --checkpoint-dir when it holds a checkpoint")
    add_model_options(p, depth_required=True)
    p.add_argument("--subset", type=int, help="first N training examples (an epoch-based recipe counts these)")
    p.add_argument("--recipe", default="mini-cpu",
                   help="bundled recipe: paper-cifar, paper-imagenet, resnet1k-batch64, mini-cpu, smoke")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="recipe override")
    p.add_argument("--iterations", type=int, help="train for K iterations, the schedule rescaled to fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", help="write checkpoints here and resume from the newest")
    p.add_argument("--data-dir", help="datasets root, an absolute path as a grid's data_dir (default $ABLATE_DATA_DIR)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores; per worker: the cores shared out)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present; cuda with --workers: one "
                   "GPU per worker)")
    p.add_argument("--workers", type=int, default=1,
                   help="split each batch over N worker processes on this machine (DistributedDataParallel; BN "
                   "per worker); part of the trial's identity")

    p = command("run", "run a grid to completion on RAY_ADDRESS or a local Ray; the same command resumes")
    p.add_argument("grid", help="a grid file (YAML or JSON) or a bundled grid name (`ablate grids`)")
    p.add_argument("--until-decided", action="store_true",
                   help="add batches of seeds to undecided comparisons only (group-sequential α spending)")
    p.add_argument("--max-seeds", type=int, help="seed cap per variant with --until-decided (default 4× the grid's)")
    p.add_argument("--batch", type=int, help="seeds added per look (default: the grid's seed count)")
    p.add_argument("--margin", type=float, help="with --until-decided: the difference that matters, in points; "
                   "a smaller one is `equivalent` or stops for futility (default 0.2)")
    p = command("status", "trial counts per state, for one grid or all")
    p.add_argument("grid", nargs="?", help="grid id or name (newest grid of that name)")
    p.add_argument("--server", help="ask the Ablate service at URL instead of the local state")
    p = command("cancel", "cancel a grid: queued trials are cancelled, running ones stopped")
    p.add_argument("grid")
    p.add_argument("--server", help="the Ablate service at URL")
    p = command("submit", "submit a grid to the Ablate service; prints its id")
    p.add_argument("grid", help="a grid file (YAML or JSON) or a bundled grid name")
    p.add_argument("--server", help=f"service URL (default $ABLATE_SERVER or {DEFAULT_SERVER})")
    p = command("serve", "the HTTP service: submitted grids run in the background")
    p.add_argument("--host", default="127.0.0.1", help="bind address (non-loopback needs ABLATE_TOKEN)")
    p.add_argument("--port", type=int, default=8600)
    p.add_argument("--mlflow-url", help="MLflow UI base URL for links in reports")
    p = command("report", "a self-contained HTML report of a grid")
    p.add_argument("grid")
    p.add_argument("-o", "--output", help="write to FILE (default: GRID.html)")
    p.add_argument("--mlflow-url", help="MLflow UI base URL for links")
    command("grids", "bundled grids: the paper's Tables 1-5 and CPU-scale versions")
    p = command("data", "download a public dataset with torchvision (MD5-checked) into the layout runs read")
    p.add_argument("action", choices=("fetch",))
    p.add_argument("dataset", help="fashion-mnist, cifar10 or cifar100")
    p.add_argument("--dir", help="datasets root to write (default $ABLATE_DATA_DIR); runs read it as ABLATE_DATA_DIR")
    p = command("tune", "an Optuna study over recipe fields on a validation split; the same command resumes it")
    p.add_argument("spec", help="a tuning spec file (YAML or JSON); see README 'Tuning recipes'")
    p = command("compare", "the comparison table of a grid")
    p.add_argument("grid")
    p.add_argument("--metric", default="test_error", choices=METRICS)
    p.add_argument("--baseline", help="variant to compare against (default: the grid's baseline)")
    p.add_argument("--format", default="table", help="table, markdown, csv, json, latex, parquet")
    p.add_argument("--design", choices=DESIGNS, default=DEFAULT_DESIGN,
                   help="Δ paired by seed (Ablate's grids share seeds across variants) or Welch's independent samples")
    p.add_argument("-o", "--output", help="write to FILE")
    p.add_argument("--server", help="ask the Ablate service at URL instead of the local state")
    p = command("plan", "seeds per comparison needed to decide a difference of D points, and their cost")
    p.add_argument("grid", help="a grid (or a pilot grid) with finished seeds")
    p.add_argument("--delta", type=float, required=True, help="the difference to decide, in points")
    p.add_argument("--power", type=float, default=0.8, help="chance of deciding it when it is there (default 0.8)")
    p.add_argument("--alpha", type=float, default=0.05, help="family-wise error (default 0.05)")
    p.add_argument("--baseline", help="variant to compare against (default: the grid's baseline)")
    p.add_argument("--server", help="ask the Ablate service at URL instead of the local state")
    return parser


def _failed(args: argparse.Namespace, message: str, code: int) -> int:
    """A command that could not do what it was asked: one line on standard error, and with --json the one
    JSON document standard output holds."""
    if args.json:
        print(json.dumps({"error": message}))
    print(f"ablate {args.command}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A shell starts a script's background jobs with SIGINT ignored, and Python keeps it so: Ctrl-C or
    # `kill -INT`, the way to stop a grid or a study and hand its trials back, would then do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # Libraries print to standard output (MLflow announces every run it ends): while a command
        # runs, that goes to standard error, so with --json standard output holds one JSON document.
        with contextlib.redirect_stdout(sys.stderr):
            result = COMMANDS[args.command](args)
    except _bad_input_types() as exc:
        return _failed(args, one_line(exc), 2)
    except KeyboardInterrupt:
        print(f"ablate {args.command}: interrupted", file=sys.stderr)
        return 130
    except ClusterError as exc:  # the run is not lost: its trials stay queued for the next start
        return _failed(args, str(exc), 1)
    code = result.pop("exit_code", 0) if isinstance(result, dict) else 0
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print_human(args.command, result)
    return code


if __name__ == "__main__":
    sys.exit(main())
