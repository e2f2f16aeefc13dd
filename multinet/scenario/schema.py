"""The scenario file: which models, which data, which steps, which budget, where to run, what to write.

Validated with pydantic (unknown keys are errors, not silently ignored); errors name the YAML path
and line and suggest the nearest valid key. ``--set a.b=value`` overrides any field.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator,
                      model_validator)

from ..options import RunOptions
from ..unification.holdout import HOLDOUT
from ..errors import MultinetError


class ScenarioError(MultinetError):
    """A scenario file that is missing, malformed or names something that does not exist."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    model: str  # zoo:NAME, package.module:factory, path/to/file.py:factory or a saved .mnet file
    args: dict[str, Any] = {}  # keyword arguments of the factory
    checkpoint: str | None = None  # state dict (tensors only) loaded into the factory's model


class DataSpec(_Strict):
    # digits | mnist | .npy/.npz/.pt file | folder of images | package.module:function | file.py:function
    source: str = "digits"
    eval_source: str | None = None  # evaluation data; without it source is split 80/20 (seeded)
    image_size: PositiveInt | tuple[PositiveInt, PositiveInt] | None = None  # folders: resize to N or [H, W]
    channels: Literal[1, 3] | None = None  # folders: grey or RGB (default: grey when every image is)
    mean: float | list[float] | None = None  # folders: per-channel normalisation of [0, 1] pixels
    std: float | list[float] | None = None
    calibration: int = Field(1024, ge=1)
    batch_size: int = Field(128, ge=1)


class BudgetSpec(_Strict):
    flops: float | None = Field(None, gt=0, lt=1)
    params: float | None = Field(None, gt=0, lt=1)
    latency_ms: float | None = Field(None, gt=0)
    round_to: int = Field(1, ge=1)
    ignore: list[str] = []
    min_channels: int | None = Field(None, ge=0)
    residual_streams: bool = True
    residual_branches: bool = False  # a block's branch may lose all its channels (x + f(x) -> x + constant)

    @model_validator(mode="after")
    def _one(self):
        if sum(v is not None for v in (self.flops, self.params, self.latency_ms)) != 1:
            raise ValueError("give exactly one of flops, params, latency_ms")
        return self


class CompressStep(_Strict):
    budget: BudgetSpec | None = None
    ratio: float | None = Field(None, ge=0, lt=1)
    schedule: Literal["auto", "exhaustive", "uniform"] = "auto"
    method: Literal["reap", "unify", "magnitude", "magnitude+ls", "random"] = "reap"
    max_positions: int | None = Field(RunOptions.max_positions, ge=1)
    skip_links: bool = False  # a layer may read an earlier tensor of the model (whole layers can go); needs a budget

    @model_validator(mode="after")
    def _either(self):
        if (self.budget is None) == (self.ratio is None):
            raise ValueError("give exactly one of budget and ratio")
        if self.skip_links and (self.budget is None or self.budget.latency_ms is not None):
            raise ValueError("skip_links need a flops or params budget")
        return self


class UnifyStep(_Strict):
    budget: BudgetSpec
    schedule: Literal["auto", "exhaustive", "uniform"] = "auto"
    max_positions: int | None = Field(RunOptions.max_positions, ge=1)
    member_weights: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] | None = None
    skip_links: bool = True  # a member's layer may read its own earlier tensors (whole layers can go)
    fuse_layers: bool = True  # members' layers that read the same tensor may be compressed as one layer
    # a link trial whose fused network runs slower than the models apart is dropped; timed at data.batch_size
    # inputs (true) or at this many (the batch the infer step runs at, e.g. 256)
    speed_check: bool | int = True
    # the fraction of the calibration samples links are judged on and nothing is fitted on (0: the same samples)
    holdout: float = Field(HOLDOUT, ge=0, le=0.5)

    @field_validator("speed_check", mode="before")
    @classmethod
    def _switch_or_batch(cls, value):
        """true, false or a batch size: 0 or 1 must not pass for a switch (YAML reads them as numbers)."""
        if isinstance(value, bool) or (isinstance(value, int) and value >= 1):
            return value
        raise ValueError("must be true, false or a batch size (a whole number >= 1)")


class EvaluateStep(_Strict):
    split: Literal["test", "train"] = "test"


class InferStep(_Strict):
    split: Literal["test", "train"] = "test"
    batch_size: int = Field(256, ge=1)


class Step(_Strict):
    compress: CompressStep | None = None
    unify: UnifyStep | None = None
    evaluate: EvaluateStep | None = None
    infer: InferStep | None = None

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("compress", "unify", "evaluate", "infer") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("each step is exactly one of compress, unify, evaluate, infer")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("compress", "unify", "evaluate", "infer") if getattr(self, k) is not None)

    @property
    def spec(self):
        return getattr(self, self.kind)


class RuntimeSpec(_Strict):
    device: str = "cpu"
    executor: Literal["local", "ray"] = "local"
    address: str | None = None  # Ray: "auto", "host:port", or None for a cluster started in this process
    seed: int = 0


class OutputSpec(_Strict):
    save_model: bool = True
    plots: bool = True


class Scenario(_Strict):
    name: str = "scenario"
    models: list[ModelSpec] = Field(min_length=1)
    data: DataSpec = DataSpec()
    steps: list[Step] = Field(min_length=1)
    runtime: RuntimeSpec = RuntimeSpec()
    outputs: OutputSpec = OutputSpec()

    @field_validator("models")
    @classmethod
    def _unique(cls, models):
        names = [m.name for m in models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate model names: {', '.join(dup)}")
        return models

    @model_validator(mode="after")
    def _unify_needs_models(self):
        if any(s.kind == "unify" for s in self.steps) and len(self.models) < 2:
            raise ValueError("a unify step needs at least two models")
        unified = False
        for i, step in enumerate(self.steps):
            unified = unified or step.kind == "unify"
            if unified and step.kind == "compress" and step.spec.skip_links:
                raise ValueError(f"step {i + 1}: compress.skip_links after a unify step: the MultiNet's skip links "
                                 f"are unify's (unify.skip_links)")
        return self


def _coerce(text: str):
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``a.b=value`` / ``steps.0.compress.budget.flops=0.3``: values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ScenarioError(f"--set {item!r} must look like key.path=value")
        path, value = item.split("=", 1)
        keys = path.split(".")
        node = raw
        for key in keys[:-1]:
            if isinstance(node, list):
                try:
                    node = node[int(key)]
                except (ValueError, IndexError):
                    raise ScenarioError(f"--set {path}: no list entry {key!r}") from None
            else:
                node = node.setdefault(key, {})
        last = keys[-1]
        if isinstance(node, list):
            try:
                node[int(last)] = _coerce(value)
            except (ValueError, IndexError):
                raise ScenarioError(f"--set {path}: no list entry {last!r}") from None
        else:
            node[last] = _coerce(value)
    return raw


def _line_of(root, loc: tuple) -> int | None:
    """1-based line of a pydantic error location in the composed YAML (None when not in the file)."""
    node, line = root, None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(key)), None)
            if match is None:
                return line
            node, line = match[1], match[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _fields_at(loc: tuple) -> list[str]:
    model = Scenario
    for key in loc[:-1]:
        if isinstance(key, int):
            continue
        field = model.model_fields.get(key)
        if field is None:
            return []
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        model = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)),
                     next((a.__args__[0] for a in inner if getattr(a, "__args__", None)
                           and isinstance(a.__args__[0], type) and issubclass(a.__args__[0], BaseModel)), None))
        if model is None:
            return []
    return list(model.model_fields)


def _message(exc: ValidationError, root, source: str) -> str:
    err = exc.errors()[0]
    loc = tuple(k for k in err["loc"] if not (isinstance(k, str) and k.startswith("function-after")))
    where = ".".join(str(k) for k in loc) or "(top level)"
    line = _line_of(root, loc) if root is not None else None
    at = f"{source}:{line}: " if line else f"{source}: "
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _fields_at(loc), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(_fields_at(loc))}"
        return f"{at}unknown key `{where}`{hint}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{at}`{where}`: {msg}" + (f" (got {err['input']!r})" if "input" in err and not isinstance(
        err["input"], (dict, list)) else "")


def load_scenario(path: str | Path, overrides: list[str] = ()) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ScenarioError(f"no scenario file at {path}") from None
    except OSError as exc:
        raise ScenarioError(f"cannot read {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}: " if mark else f"{path}: "
        raise ScenarioError(f"{where}not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a scenario is a mapping with models, data, steps, runtime, outputs")
    raw = apply_overrides(raw, list(overrides))
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ScenarioError(_message(exc, root, str(path))) from None
    return anchor_paths(scenario, path.parent)


def anchor_paths(scenario: Scenario, base_dir: Path) -> Scenario:
    """Relative model, checkpoint and data paths made absolute from the scenario file's folder.

    So a scenario runs the same from any working directory, and the resolved copy in the run
    directory names the files it read.
    """
    from ..io.sources import anchor
    from ..io.user_data import anchor_data

    models = [m.model_copy(update={"model": anchor(m.model, base_dir),
                                   "checkpoint": m.checkpoint and anchor(m.checkpoint, base_dir)})
              for m in scenario.models]
    d = scenario.data
    data = d.model_copy(update={"source": anchor_data(d.source, base_dir),
                                "eval_source": d.eval_source and anchor_data(d.eval_source, base_dir)})
    return scenario.model_copy(update={"models": models, "data": data})
