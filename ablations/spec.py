"""What a residual network is, as data: the model specification and the named variants.

Every choice the paper ablates is a field here, checked up front against a table of valid names, so a
typo fails with the list of choices before any module is built.
"""
from __future__ import annotations

import difflib

import re
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from .vocabulary import DATASET_SHAPES, excerpt

# Activation placements of Fig. 4 (a)-(e).
UNITS = ("original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact")
# Shortcut types of Fig. 2 (a)-(f); `dropout` is the paper's (a keep-mask, expectation 1 − p on the shortcut),
# `inverted_dropout` the common rescaled form (expectation 1), kept as a separate network.
SHORTCUTS = ("identity", "scale", "exclusive_gate", "shortcut_gate", "conv1x1", "dropout", "inverted_dropout")
# `single`: one 3×3 convolution in F, the "1-layer skip" ResNet-110 of Table 3.
BLOCKS = ("basic", "bottleneck", "single")
# Depths named by the papers, with the block they used: He et al. 2015 (basic) and 2016 (bottleneck).
PAPER_DEPTHS = {20: "basic", 32: "basic", 44: "basic", 56: "basic", 110: "basic", 1202: "basic",
                164: "bottleneck", 1001: "bottleneck"}
# Convolutions per unit and the depth formula's multiplier: single 3n+2, basic 6n+2, bottleneck 9n+2.
LAYERS_PER_UNIT = {"basic": 2, "bottleneck": 3, "single": 1}
# Network plans. `cifar`: conv3×3 stem, three stages of n units (He et al. 2015, §4.2). `imagenet`: conv7×7/2
# stem and 3×3/2 max-pool, four stages whose unit counts a table of depths gives (He et al. 2015, Table 1;
# fb.resnet.torch resnet.lua and preresnet.lua): depth → (block, units per stage).
IMAGENET_STAGES = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)), 50: ("bottleneck", (3, 4, 6, 3)),
                   101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3)),
                   200: ("bottleneck", (3, 24, 36, 3))}
# The network plan each dataset takes (the rest take `cifar`).
DATASET_PLANS = {"imagenet": "imagenet"}

# Fields that only mean something for one shortcut type; setting them elsewhere is a mistake.
SHORTCUT_FIELDS = {"shortcut_scale": ("scale",), "residual_scale": ("scale",),
                   "gate_bias": ("exclusive_gate", "shortcut_gate"),
                   "dropout": ("dropout", "inverted_dropout")}


class SpecError(ValueError):
    """A specification that cannot be built; the message is one line naming the valid choices."""


# Bounds on a YAML or JSON document, checked on its parse events before any object is built. A spec is a
# few hundred nodes four levels deep; a seed list as long as the trial cap (5000) is 5000 nodes.
# Aliases stay allowed (an anchored recipe shared by variants is fair use) but count as the nodes they
# repeat: nine levels of ten `*a` are 10^9 nodes in 589 bytes, and before this bound such a grid took
# the service 10.7 s and 1.97 GB to answer with a 522 MB error message.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 32  # deeper nesting overflowed the Python stack (RecursionError) at about 1000 levels
MAX_YAML_SCALAR = 4096  # characters: a path fits; a longer number is only work (YAML 1.1 reads 1:2:3 as base 60)

def _choice(field: str, value: str, choices) -> str:
    if value not in choices:
        raise SpecError(f"unknown {field} {excerpt(value)}; choose one of: {', '.join(map(str, choices))}")
    return value


def units_per_stage(depth: int, block: str) -> int:
    """n of the depth formula (3n+2 single, 6n+2 basic, 9n+2 bottleneck), or SpecError when the depth does not fit."""
    per = 3 * LAYERS_PER_UNIT[block]
    if depth < per + 2 or (depth - 2) % per:
        examples = [str(d) for d, b in PAPER_DEPTHS.items() if b == block] or ["110"]
        raise SpecError(f"depth {depth} does not fit block {block!r}: it must be {per}n+2 with n >= 1 "
                        f"(e.g. {', '.join(examples)})")
    return (depth - 2) // per


def omit_at_defaults(*names: str):
    """A wrap serializer for a configuration model that leaves `names` out of its dump while they hold their
    defaults: fields added after trial keys were first made, so every earlier configuration keeps its trial
    key (a hash of the dump) and its checkpoints (which hold the dump)."""
    def serialize(self, handler) -> dict[str, Any]:
        data = handler(self)
        for name in names:
            if getattr(self, name) == type(self).model_fields[name].default:
                data.pop(name, None)
        return data
    return model_serializer(mode="wrap")(serialize)


def dataset_model_fields(dataset: str) -> dict[str, Any]:
    """The model fields a dataset decides: input channels, classes and the network plan."""
    channels, _, classes = DATASET_SHAPES[_choice("dataset", dataset, DATASET_SHAPES)]
    return {"in_channels": channels, "num_classes": classes, "plan": DATASET_PLANS.get(dataset, "cifar")}


class ModelSpec(BaseModel):
    """One residual network: any placement × any shortcut × any block, at any fitting depth, on either plan."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: int = Field(ge=8, le=5000)
    block: Literal["basic", "bottleneck", "single"] | None = None
    width: int | None = Field(None, ge=1, le=1024, description="stem width (default 16 on the cifar plan, 64 on "
                              "imagenet); stage inner widths are width × 1, 2, 4 (, 8)")
    unit: str = "original"
    shortcut: str = "identity"
    shortcut_scale: float = Field(1.0, ge=0.0, le=4.0, description="λ on h(x) (Fig. 2b)")
    residual_scale: float = Field(1.0, ge=0.0, le=4.0, description="scale on F (Fig. 2b)")
    gate_bias: float = Field(0.0, ge=-30.0, le=30.0, description="initial b_g of g(x)=σ(W_g x + b_g)")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="drop ratio on the shortcut (Fig. 2f)")
    downsample: Literal["A", "B"] | None = None
    in_channels: int = Field(3, ge=1, le=64)
    num_classes: int = Field(10, ge=2, le=100000)
    plan: Literal["cifar", "imagenet"] = Field("cifar", description="stem and stages; the dataset picks it")

    @model_validator(mode="after")
    def _resolve(self) -> "ModelSpec":
        _choice("unit", self.unit, UNITS)
        _choice("shortcut", self.shortcut, SHORTCUTS)
        block = self.block
        if self.plan == "imagenet":
            if self.depth not in IMAGENET_STAGES:
                raise SpecError(f"depth {self.depth} has no ImageNet plan; choose one of: "
                                f"{', '.join(f'{d} ({b})' for d, (b, _) in IMAGENET_STAGES.items())}")
            planned = IMAGENET_STAGES[self.depth][0]
            if block not in (None, planned):
                raise SpecError(f"the ImageNet ResNet-{self.depth} uses block {planned!r}, not {block!r}")
            block = planned
        elif block is None:
            if self.depth not in PAPER_DEPTHS:
                raise SpecError(f"depth {self.depth} is not one the papers name "
                                f"({', '.join(map(str, PAPER_DEPTHS))}): say block 'basic', 'bottleneck' or "
                                f"'single'")
            block = PAPER_DEPTHS[self.depth]
        else:
            units_per_stage(self.depth, block)
        for field, shortcuts in SHORTCUT_FIELDS.items():
            # Only a non-default value is a mistake: a dumped spec carries every field.
            changed = getattr(self, field) != type(self).model_fields[field].default
            if field in self.model_fields_set and changed and self.shortcut not in shortcuts:
                raise SpecError(f"{field} applies only to shortcut {' or '.join(shortcuts)}, "
                                f"not {self.shortcut!r}")
        # Frozen model: resolved defaults are written through object.__setattr__ once, here.
        object.__setattr__(self, "block", block)
        if self.width is None:
            object.__setattr__(self, "width", 64 if self.plan == "imagenet" else 16)
        if self.downsample is None:
            # A for the CIFAR plan's single and basic blocks (the original CIFAR ResNets), B for bottlenecks
            # (the pre-activation reference code) and on ImageNet (fb.resnet.torch's default there).
            object.__setattr__(self, "downsample", "A" if self.plan == "cifar" and block != "bottleneck" else "B")
        return self

    # Fields added after trial keys were first made, left out of the dump at their defaults.
    _later = omit_at_defaults("plan")

    @property
    def stages(self) -> tuple[int, ...]:
        """Units per stage: the ImageNet table's four, or the depth formula's n in each of three."""
        if self.plan == "imagenet":
            return IMAGENET_STAGES[self.depth][1]
        return (units_per_stage(self.depth, self.block),) * 3

    @property
    def preact(self) -> bool:
        return self.unit in ("relu_only_preact", "full_preact")


def _first_error(exc: ValidationError) -> dict[str, Any]:
    """pydantic's first error, or, when that is only the input failing one member of a union ("not a string"),
    the first error of the same field that says what is wrong with the input in the member it fits."""
    errors = exc.errors()
    first = errors[0]
    if first["type"].endswith("_type"):
        return next((e for e in errors if e["loc"][:1] == first["loc"][:1] and not e["type"].endswith("_type")),
                    first)
    return first


def validation_reason(exc: ValidationError, subject: str) -> str:
    """pydantic's first error in one line: the field path, the reason and, for type errors, the value."""
    err = _first_error(exc)
    # Union members show up in the path as type names ("str", "list[...]", "function-after[...]"): not fields.
    # A path can hold an input's own key (an unknown field), so each part is cut short too.
    where = ".".join(str(p) if len(str(p)) <= 40 else excerpt(str(p), 40) for p in err["loc"]
                     if not re.match(r"^(str|int|float|list\[|dict\[|function-after\[|[A-Z]\w*Spec$)", str(p)))
    value = "" if err["type"] == "value_error" else f" (got {excerpt(err.get('input'))})"
    return f"{where or subject}: {err['msg'].removeprefix('Value error, ')}{value}"


def raise_one_line(exc: ValidationError, error: type[ValueError], subject: str) -> NoReturn:
    """Re-raise a validation failure as `error` with one line; our own errors inside pass through."""
    inner = (_first_error(exc).get("ctx") or {}).get("error")
    if isinstance(inner, error):
        raise inner from None
    raise error(validation_reason(exc, subject)) from None


M = TypeVar("M", bound=BaseModel)


def validate_mapping(model: type[M], data: Any, error: type[ValueError], subject: str, fields: str) -> M:
    """A spec (grid, tuning study) from parsed YAML/JSON: not a mapping, or invalid, is one `error` line."""
    if not isinstance(data, dict):
        raise error(f"a {subject} is a mapping of fields ({fields}), got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise_one_line(exc, error, subject)


def spec_text(source: str, error: type[ValueError], subject: str) -> str:
    """`source` itself when it holds a document (a newline), else the text of the file it names."""
    if "\n" in source:
        return source
    try:
        return Path(source).read_text()
    except FileNotFoundError:
        raise error(f"{subject} file {excerpt(source)} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {subject} file {excerpt(source)}: {exc}") from None


def load_yaml(text: str, error: type[ValueError], subject: str) -> Any:
    """YAML (or JSON) text with the safe loader (no Python objects), within the bounds above; a syntax
    error, a bound passed or a value Python cannot hold is one `error` line."""
    import yaml
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the same document, 8x faster
    try:
        _check_bounds(yaml.parse(text, Loader=loader), error, subject)
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = (getattr(exc, "problem", None) or str(exc)).splitlines()[0]
        raise error(f"{subject} is not valid YAML{where}: {problem}") from None
    except ValueError as exc:
        if isinstance(exc, error):
            raise
        # YAML reads it, Python cannot hold it: a date such as 2001-13-45.
        raise error(f"{subject} holds a value that cannot be read: {exc}") from None


def _check_bounds(events, error: type[ValueError], subject: str) -> None:
    """Walk the parse events once, counting each node as what it stands for once aliases are expanded."""
    import yaml
    named: dict[str, int] = {}  # anchor → nodes in what it names
    open_: list[list] = []  # collections being read: [anchor, nodes so far]
    for event in events:
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            open_.append([event.anchor, 1])
            if len(open_) > MAX_YAML_DEPTH:
                raise error(f"{subject} nests deeper than {MAX_YAML_DEPTH} levels "
                            f"(line {event.start_mark.line + 1})")
            continue
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, nodes = open_.pop()
        elif isinstance(event, yaml.ScalarEvent):
            if len(event.value) > MAX_YAML_SCALAR:
                raise error(f"{subject} has a value over {MAX_YAML_SCALAR} characters "
                            f"(line {event.start_mark.line + 1})")
            anchor, nodes = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            anchor, nodes = None, named.get(event.anchor, 1)  # an unknown anchor: the loader says so
        else:
            continue  # stream and document boundaries
        if anchor is not None:
            named[anchor] = nodes
        if open_:
            open_[-1][1] += nodes
            nodes = open_[-1][1]
        if nodes > MAX_YAML_NODES:
            raise error(f"{subject} has more than {MAX_YAML_NODES} values once its aliases are expanded")


def make_spec(**fields: Any) -> ModelSpec:
    """ModelSpec from loose input, with pydantic's errors turned into one SpecError line."""
    try:
        return ModelSpec(**fields)
    except ValidationError as exc:
        raise_one_line(exc, SpecError, "model")


# Named variants: the paper's figures as a few lines of data each. A grid names these or writes its own.
VARIANTS: dict[str, dict[str, Any]] = {
    # Fig. 4 / Table 2: activation placements, identity shortcut.
    "original": dict(unit="original"),
    "bn_after_add": dict(unit="bn_after_add"),
    "relu_before_add": dict(unit="relu_before_add"),
    "relu_only_preact": dict(unit="relu_only_preact"),
    "full_preact": dict(unit="full_preact"),
    # Fig. 2 / Table 1: shortcuts on the original unit.
    "scale-0": dict(shortcut="scale", shortcut_scale=0.0, residual_scale=1.0),
    "scale-0.5": dict(shortcut="scale", shortcut_scale=0.5, residual_scale=1.0),
    "scale-0.5-0.5": dict(shortcut="scale", shortcut_scale=0.5, residual_scale=0.5),
    "exclusive_gate-b0": dict(shortcut="exclusive_gate", gate_bias=0.0),
    "exclusive_gate-b-6": dict(shortcut="exclusive_gate", gate_bias=-6.0),
    "exclusive_gate-b-7": dict(shortcut="exclusive_gate", gate_bias=-7.0),
    "shortcut_gate-b0": dict(shortcut="shortcut_gate", gate_bias=0.0),
    "shortcut_gate-b-6": dict(shortcut="shortcut_gate", gate_bias=-6.0),
    "conv1x1": dict(shortcut="conv1x1"),
    "dropout-0.5": dict(shortcut="dropout", dropout=0.5),
    # Not in the paper: inverted dropout (identity at evaluation), to show the paper's form is what fails.
    "inverted_dropout-0.5": dict(shortcut="inverted_dropout", dropout=0.5),
    # Table 3: the "1-layer skip" ResNet-110, one 3×3 convolution in F (depth 3n+2), before and after.
    "original-1layer": dict(unit="original", block="single"),
    "full_preact-1layer": dict(unit="full_preact", block="single"),
}
FIGURES = {"original": "Fig. 2(a) / 4(a)", "bn_after_add": "Fig. 4(b)", "relu_before_add": "Fig. 4(c)",
           "relu_only_preact": "Fig. 4(d)", "full_preact": "Fig. 4(e)", "scale-0": "Fig. 2(b)",
           "scale-0.5": "Fig. 2(b)", "scale-0.5-0.5": "Fig. 2(b)", "exclusive_gate-b0": "Fig. 2(c)",
           "exclusive_gate-b-6": "Fig. 2(c)", "exclusive_gate-b-7": "Fig. 2(c)",
           "shortcut_gate-b0": "Fig. 2(d)", "shortcut_gate-b-6": "Fig. 2(d)", "conv1x1": "Fig. 2(e)",
           "dropout-0.5": "Fig. 2(f)", "inverted_dropout-0.5": "Fig. 2(f), inverted (not in the paper)",
           "original-1layer": "Table 3 (1-layer skip)", "full_preact-1layer": "Table 3 (1-layer skip)"}
MODEL_FIELDS = tuple(name for name in ModelSpec.model_fields if name not in ("depth",))


def variant_fields(name: str) -> dict[str, Any]:
    """The model fields of a catalogue variant, or SpecError listing the catalogue."""
    return dict(VARIANTS[_choice("variant", name, VARIANTS)])


def check_variant(name: str) -> str:
    """`name` when the catalogue has it, else ValueError listing the catalogue (a spec may write its own)."""
    if name not in VARIANTS:
        near = difflib.get_close_matches(name, VARIANTS, n=3) if isinstance(name, str) and len(name) < 100 else []
        hint = f" (did you mean {' or '.join(near)}?)" if near else ""
        # The catalogue has outgrown one line of error: `ablate models` prints it with each entry's figure.
        raise ValueError(f"unknown variant {excerpt(name)}{hint}; catalogue: `ablate models` lists its "
                         f"{len(VARIANTS)} names (or write a mapping with name and model fields)")
    return name


# A catalogue name as a field type of the spec models (grid, tuning study).
CatalogueVariant = Annotated[str, AfterValidator(check_variant)]
