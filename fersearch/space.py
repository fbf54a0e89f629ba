"""Search spaces as data (`search_spaces/<model>.yaml`), validated against the model's config.

File format:

    model: cnn
    params:                      # in order; a later key may depend on an earlier one
      lr: {loguniform: [1.0e-4, 0.3]}
      optimizer: {choice: [sgd, adam, adamw]}
      momentum: {uniform: [0.5, 0.99], when: {optimizer: sgd}}
      batch_size: {choice: [32, 64, 128]}
      channels: {choice: ["6,16", "32,64"]}
      epochs: 27                 # a plain value is fixed
    points:                      # known configurations, run first and in this order
      seed: {}                   # the model's defaults: the seed's configuration
      modern: {lr: 0.05, ...}    # the model's defaults with these values
      strong: modern             # a recipe of config.RECIPES, by name

Distributions: `choice: [..]`, `uniform: [lo, hi]`, `loguniform: [lo, hi]`, `int: [lo, hi]`
(`int` takes an optional `log: true`). `when: {key: value or [values]}` makes a parameter
conditional: it is sampled only when every named key has one of the values, and otherwise left
at the model's default.

A point is a whole configuration (model defaults plus its values, plus what `--fixed` pins and
the search's epochs), not bound by the space: the seed's configuration may lie outside a focused
space. A point inside the space is given to Optuna like any trial; one outside it is run and
recorded but never told to Optuna, whose model then only holds configurations of its space.
`baseline: {...}` (the older form) means `points: {seed: {...}}`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fersearch.config import RECIPES, config_keys, resolve_config
from fersearch.errors import FersearchError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")


def _spaces_dir() -> Path:
    """The default spaces: packaged beside this module in an installed wheel, else the
    checkout's top-level search_spaces/ (a source tree or an editable install)."""
    packaged = Path(__file__).resolve().with_name("search_spaces")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "search_spaces"


SPACES_DIR = _spaces_dir()


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # one of DISTRIBUTIONS
    args: tuple[Any, ...]
    log: bool = False
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def active(self, values: Mapping[str, Any]) -> bool:
        return all(values.get(key) in allowed for key, allowed in self.when)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.args
        low, high = self.args
        return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high

    @property
    def log_scale(self) -> bool:
        return self.log or self.kind == "loguniform"

    @property
    def distribution(self) -> Any:
        """The Optuna distribution this parameter is drawn from (what `suggest` asks for)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.args))
        if self.kind == "int":
            return IntDistribution(int(self.args[0]), int(self.args[1]), log=self.log)
        return FloatDistribution(float(self.args[0]), float(self.args[1]), log=self.kind == "loguniform")

    def suggest(self, trial: Any) -> Any:
        """Sample through an Optuna trial (define-by-run)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.args))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.args[0], self.args[1], log=self.log)
        return trial.suggest_float(self.name, self.args[0], self.args[1], log=self.kind == "loguniform")


@dataclass(frozen=True)
class SearchSpace:
    model: str
    params: tuple[Param, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    points: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""
    pinned: dict[str, Any] = field(default_factory=dict)  # --fixed and epochs: bind points too

    def sample(self, trial: Any) -> dict[str, Any]:
        """Define-by-run sampler for Optuna: returns the fixed values; sampled ones are captured."""
        values: dict[str, Any] = dict(self.fixed)
        for param in self.params:
            if param.active(values):
                values[param.name] = param.suggest(trial)
        return dict(self.fixed)

    def point(self, name: str) -> dict[str, Any]:
        """A known point's whole configuration, every key spelled out (as MLflow params are)."""
        return resolve_config(self.model, {**self.points[name], **self.pinned}).to_params()

    def searched_values(self, overrides: Mapping[str, Any]) -> dict[str, Any] | None:
        """The searched values that make `overrides`' configuration, or None when the space
        cannot express it (a fixed key differs, or a value lies outside its distribution)."""
        target = resolve_config(self.model, overrides)
        wanted = target.to_params()
        values: dict[str, Any] = dict(self.fixed)
        chosen: dict[str, Any] = {}
        for param in self.params:
            if not param.active(values):
                continue
            if not param.contains(wanted[param.name]):
                return None
            values[param.name] = chosen[param.name] = wanted[param.name]
        try:
            same = resolve_config(self.model, values) == target
        except FersearchError:
            return None
        return chosen if same else None

    def searched(self) -> list[str]:
        return [p.name for p in self.params]


def _param(source: str, name: str, spec: Mapping[str, Any], keys: list[str]) -> Param:
    where = f"{source}: params.{name}"
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = [k for k in spec if k not in DISTRIBUTIONS and k not in ("when", "log")]
    if len(kinds) != 1 or extra:
        raise FersearchError(
            f"{where}: expected exactly one of {', '.join(DISTRIBUTIONS)} (plus optional when/log), "
            f"got {', '.join(map(str, spec)) or 'nothing'}"
        )
    kind = kinds[0]
    args = spec[kind]
    if not isinstance(args, list) or not args:
        raise FersearchError(f"{where}: {kind} needs a non-empty list")
    if kind == "choice":
        if len(set(map(repr, args))) != len(args):
            raise FersearchError(f"{where}: choice lists a value twice")
        for value in args:
            if not isinstance(value, (str, int, float, bool)):
                raise FersearchError(f"{where}: choice values must be names or numbers, got {value!r}")
    else:
        if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
            raise FersearchError(f"{where}: {kind} needs [low, high] numbers, got {args!r}")
        low, high = args
        if not low < high:
            raise FersearchError(f"{where}: {kind} range [{low}, {high}] is empty or inverted")
        if kind == "loguniform" and low <= 0:
            raise FersearchError(f"{where}: loguniform needs low > 0, got {low}")
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise FersearchError(f"{where}: int range needs integer bounds")
        if any(not math.isfinite(a) for a in args):
            raise FersearchError(f"{where}: bounds must be finite")
        args = [int(low), int(high)] if kind == "int" else [float(low), float(high)]
    when = spec.get("when", {})
    if not isinstance(when, Mapping):
        raise FersearchError(f"{where}: when must map keys to values")
    for key in when:
        if key not in keys:
            raise FersearchError(f"{where}: when names unknown key {key!r}")
    conditions = tuple(
        (key, tuple(v) if isinstance(v, list) else (v,)) for key, v in when.items()
    )
    return Param(name, kind, tuple(args), bool(spec.get("log", False)), conditions)


def load_space(path: str | Path, model: str | None = None) -> SearchSpace:
    """Read and validate a space file; every error names the file and the key."""
    path = Path(path)
    source = str(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise FersearchError(f"cannot read search space {path} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise FersearchError(f"{path} is not UTF-8 text (byte {exc.start}); a search space is a YAML file") from None
    except yaml.YAMLError as exc:
        raise FersearchError(f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, Mapping):
        raise FersearchError(f"{path}: expected a mapping with model and params")
    unknown_top = set(doc) - {"model", "params", "points", "baseline"}
    if unknown_top:
        raise FersearchError(f"{path}: unknown top-level key {sorted(unknown_top)[0]!r}")
    file_model = str(doc.get("model", model or ""))
    if model and file_model != model:
        raise FersearchError(f"{path} is a space for model {file_model!r}, not {model!r}")
    try:
        keys = config_keys(file_model)
    except FersearchError as exc:
        raise FersearchError(f"{path}: {exc}") from None
    params_doc = doc.get("params")
    if not isinstance(params_doc, Mapping) or not params_doc:
        raise FersearchError(f"{path}: params must be a non-empty mapping")
    params, fixed = [], {}
    for name, spec in params_doc.items():
        if name not in keys or name == "model":
            raise FersearchError(f"{path}: params.{name} is not a hyperparameter of model {file_model}")
        if isinstance(spec, Mapping):
            params.append(_param(source, name, spec, keys))
        else:
            fixed[name] = spec
    points = doc.get("points")
    if "baseline" in doc:
        if points is not None:
            raise FersearchError(f"{path}: give points or baseline, not both")
        points = {"seed": doc.get("baseline") or {}}
    points = {"seed": {}} if points is None else points
    if not isinstance(points, Mapping):
        raise FersearchError(f"{path}: points must map names to mappings of key: value (or a recipe's name)")
    points = {str(name): _point(path, file_model, str(name), values) for name, values in points.items()}
    space = SearchSpace(file_model, tuple(params), fixed, points, source)
    _check_conditions(space)
    _check_values(space)
    return space


def _point(path: Path, model: str, name: str, values: Any) -> dict[str, Any]:
    """A point's values: a mapping of key: value, or the name of one of config.RECIPES (one
    definition of a recipe that several spaces run)."""
    if isinstance(values, str):
        recipes = RECIPES.get(model, {})
        if values not in recipes:
            known = ", ".join(recipes) or "none"
            raise FersearchError(f"{path}: points.{name}: no recipe named {values!r} for {model} (recipes: {known})")
        return dict(recipes[values])
    if not isinstance(values or {}, Mapping):
        raise FersearchError(f"{path}: points must map names to mappings of key: value (or a recipe's name)")
    return dict(values or {})


def _check_conditions(space: SearchSpace) -> None:
    """Every `when:` value must be one the named key can take (a choice drawn before it, a fixed
    value, or the model's default): otherwise the parameter is silently never searched."""
    defaults = resolve_config(space.model, {}).to_params()
    earlier: dict[str, Param] = {}
    for param in space.params:
        for key, allowed in param.when:
            where = f"{space.source}: params.{param.name}: when {key}"
            if key in earlier:
                drawn = earlier[key]
                if drawn.kind != "choice":
                    continue  # a range: any value of it may be named
                possible = list(drawn.args)
            elif key in space.fixed:
                possible = [space.fixed[key]]
            elif any(p.name == key for p in space.params):
                raise FersearchError(f"{where}: {key} is drawn after {param.name}; list it first")
            else:
                possible = [defaults.get(key)]
            missing = [v for v in allowed if v not in possible]
            if missing:
                raise FersearchError(
                    f"{where}: {', '.join(map(repr, missing))} is never a value of {key} "
                    f"(it takes {', '.join(map(repr, possible))}), so {param.name} would never be searched")
        earlier[param.name] = param


def _check_values(space: SearchSpace) -> None:
    """Every fixed value, every choice and both ends of every range must be a valid config."""
    error = first_error(space, dict(space.fixed))
    if error is not None:
        raise FersearchError(f"{space.source}: {error}") from None
    for param in space.params:
        for value in param.args:
            error = first_error(space, {**space.fixed, param.name: value}, skip=param.name)
            if error is not None:
                raise FersearchError(f"{space.source}: params.{param.name}: {value!r}: {error}") from None
    for name in space.points:
        try:
            space.point(name)
        except FersearchError as exc:
            raise FersearchError(f"{space.source}: points.{name}: {exc}") from None


def first_error(space: SearchSpace, values: dict[str, Any], skip: str | None = None) -> str | None:
    """Why `values` (the fixed ones, and one drawn value) can never make a valid configuration,
    or None when they can: tried alone, then with each other parameter set to each of its
    values (a combination such as nesterov with adam, or valid padding with five 5x5 stages,
    depends on the other draws; a value no other single draw makes valid, such as a width of 0,
    cannot pass in any trial)."""
    try:
        resolve_config(space.model, values)
        return None
    except FersearchError as exc:
        first = str(exc)
    for other in space.params:
        if other.name == skip:
            continue
        for candidate in other.args:
            try:
                resolve_config(space.model, {**values, other.name: candidate})
                return None
            except FersearchError:
                continue
    return first


def default_space_path(model: str) -> Path:
    return SPACES_DIR / f"{model}.yaml"


def space_path(model: str, space: str | None) -> Path:
    """`--space`: a file path, or a name of `search_spaces/` (`default`: MODEL.yaml, `broad`:
    MODEL-broad.yaml)."""
    if not space or space == "default":
        return default_space_path(model)
    named = SPACES_DIR / f"{model}-{space}.yaml"
    if named.is_file():
        return named
    if Path(space).expanduser().is_file():
        return Path(space).expanduser().resolve()
    names = sorted(["default"] + [p.stem[len(model) + 1 :] for p in SPACES_DIR.glob(f"{model}-*.yaml")])
    raise FersearchError(f"--space {space!r} is neither a file nor a space of {model} ({', '.join(names)})")
