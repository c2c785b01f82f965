"""The one definition of every Detector parameter: its type, default, allowed values and meaning.

Each config dataclass (a family's model config, :class:`~unusual.models.columns.FeatureConfig`,
:class:`~unusual.models.training.TrainConfig`, :class:`~unusual.models.thresholds.ThresholdConfig`)
declares its fields with :func:`param`. From those declarations come:

- the checks every config runs when built (:func:`validate`, from ``__post_init__``) and the type check
  of a value given by a user (:func:`check_type`: ``--param epochs=three`` is one line naming it);
- the scikit-learn estimators' keyword parameters, defaults and ``_parameter_constraints``
  (:func:`estimator_parameters`, :func:`sklearn_constraints`);
- the README's parameter table (:func:`parameter_table`, checked by ``tests/test_readme.py``) and the
  keys ``unusual fit --help`` lists.

Reads nothing and imports no model code: the registry names the configs.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace

_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


def param(default=MISSING, *, help: str, factory=None, choices: tuple | None = None, ge=None, gt=None,
          lt=None, le=None, shown: str | None = None):
    """A config field: its default (or ``factory``), meaning (``help``, the README's words), allowed
    values (``choices``) or bounds (``ge`` / ``gt`` / ``lt`` / ``le``; None always passes where the type
    allows it), and ``shown``: how the README writes a default that is computed (``None: half the window``)."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "lt": lt, "le": le, "shown": shown}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _interval(m) -> str:
    lo = f"[{m['ge']}" if m["ge"] is not None else f"({m['gt']}" if m["gt"] is not None else None
    hi = f"{m['le']}]" if m["le"] is not None else f"{m['lt']})" if m["lt"] is not None else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + lo[1:]
    return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]


def _out_of_bounds(v, m) -> bool:
    return ((m["ge"] is not None and not v >= m["ge"]) or (m["gt"] is not None and not v > m["gt"])
            or (m["lt"] is not None and not v < m["lt"]) or (m["le"] is not None and not v <= m["le"]))


def validate(config) -> None:
    """The declared checks of every field of ``config``: a ValueError naming the field."""
    for f in fields(config):
        m, v = f.metadata, getattr(config, f.name)
        if not m:
            continue
        if m["choices"] is not None and v not in m["choices"]:
            raise ValueError(f"{f.name} must be one of {m['choices']}; got {v!r}")
        bounded = any(m[k] is not None for k in ("ge", "gt", "lt", "le"))
        if bounded and v is not None and _out_of_bounds(v, m):
            raise ValueError(f"{f.name} must be {_interval(m)}; got {v!r}")


def _options(cls, name: str) -> tuple:
    hint = typing.get_type_hints(cls)[name]
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    return typing.get_args(hint) if union else (hint,)


def _fits(t, value) -> bool:
    base = typing.get_origin(t) or t
    if t is type(None):
        return value is None
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(value, base) if isinstance(base, type) else True


def check_type(name: str, value, cls) -> None:
    """A TypeError naming ``name`` unless ``value`` fits the type of ``cls``'s field (an int where a float
    is asked is fine; bools are not numbers): ``--param epochs=three`` is one line, not a comparison
    error deep inside a config."""
    options = _options(cls, name)
    if not any(_fits(t, value) for t in options):
        words = " or ".join(
            "null" if t is type(None) else _TYPE_WORDS.get(typing.get_origin(t) or t, getattr(t, "__name__", str(t)))
            for t in options
        )
        raise TypeError(f"parameter {name!r} must be {words}; got {value!r}")


# ----------------------------------------------------------------- the tree


@dataclass(frozen=True)
class Parameter:
    """One Detector parameter of one group: where it is declared, its default for a family, its meaning."""

    name: str  # as the user gives it (the scikit-learn estimators rename ``score``: SKLEARN_RENAMED)
    group: str  # "features", "model", "train" or "threshold"
    cls: type  # the config class that declares it
    default: object
    help: str
    shown: str | None
    meta: dict = field(repr=False, hash=False, compare=False, default_factory=dict)
    declared: str = ""  # the field's name in ``cls``


def groups(kind: str) -> dict[str, type]:
    """The config classes a Detector of ``kind`` is built from, by group."""
    from .columns import FeatureConfig
    from .registry import family
    from .thresholds import ThresholdConfig
    from .training import TrainConfig

    return {"model": family(kind).config, "features": FeatureConfig, "train": TrainConfig,
            "threshold": ThresholdConfig}


def tree(kind: str, clean: bool = False) -> list[Parameter]:
    """Every parameter of a ``kind`` Detector with the default it trains with (the family's
    ``train_defaults``, or ``clean_defaults`` with ``clean=True``, over the config classes' own)."""
    from .registry import family

    fam = family(kind)
    overrides = {**fam.train_defaults, **(fam.clean_defaults if clean else {})}
    out = []
    for group, cls in groups(kind).items():
        for f in fields(cls):
            default = f.default_factory() if f.default is MISSING else f.default
            out.append(Parameter(f.name, group, cls, overrides.get(f.name, default), f.metadata.get("help", ""),
                                 f.metadata.get("shown"), dict(f.metadata), f.name))
    return out


def parameter_keys() -> list[str]:
    """Every Detector parameter of every family (``--param KEY=VALUE``; the README's table)."""
    from .registry import kinds

    return sorted({p.name for k in kinds() for p in tree(k)})


# ----------------------------------------------------------------- scikit-learn

# Estimator parameter -> Detector parameter, where the names differ (``score`` would shadow
# scikit-learn's ``score`` method, which scorers and checks look for).
SKLEARN_RENAMED = {"score": "score_type"}
# The feature parameters the estimators take (their input is a numeric matrix: no column choice,
# categories or NaN policy).
SKLEARN_FEATURES = ("scaling",)


def estimator_parameters(kind: str) -> list[Parameter]:
    """The scikit-learn estimator's parameters of ``kind``, in order: the model's, ``scaling``, the
    training's, the threshold's (named as the estimator names them)."""
    out = []
    for p in tree(kind):
        if p.group == "features" and p.name not in SKLEARN_FEATURES:
            continue
        default = tuple(p.default) if isinstance(p.default, list) else p.default  # scikit-learn: immutable
        name = SKLEARN_RENAMED.get(p.name, p.name) if p.group == "model" else p.name
        out.append(replace(p, name=name, default=default))
    return out


def sklearn_constraints(p: Parameter) -> list:
    """scikit-learn's ``_parameter_constraints`` entry of ``p``, from its type, choices and bounds."""
    from numbers import Integral, Real

    from sklearn.utils._param_validation import Interval, StrOptions

    options = _options(p.cls, p.declared)
    out: list = [None] if type(None) in options else []
    m = p.meta
    if m.get("choices") is not None:
        return out + [StrOptions({c for c in m["choices"] if c is not None})]
    for t in options:
        base = typing.get_origin(t) or t
        if base is bool:
            out.append("boolean")
        elif base in (int, float):
            lo = m.get("ge") if m.get("ge") is not None else m.get("gt")
            hi = m.get("le") if m.get("le") is not None else m.get("lt")
            closed = {(True, True): "both", (True, False): "left", (False, True): "right", (False, False): "neither"}[
                (m.get("ge") is not None, m.get("le") is not None)]
            out.append(Interval(Integral if base is int else Real, lo, hi, closed=closed))
        elif base in (list, tuple):
            out += [tuple, list]
        elif t is not type(None):
            out.append(base)
    return out


# ----------------------------------------------------------------- the README's table

_GROUP_TITLES = {"features": "features", "train": "training", "threshold": "threshold"}


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return f"`{value}`"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default_cell(rows: list[tuple[str, Parameter]], clean: dict) -> str:
    """One default, or each family's where they differ; and the ``clean=True`` value where it differs."""
    texts: dict[str, list[str]] = {}
    for kind, p in rows:
        texts.setdefault(p.shown or _shown(p.default), []).append(kind)
    if len(texts) == 1:
        cell = next(iter(texts))
    else:
        cell = "; ".join(f"{t} ({', '.join(ks)})" for t, ks in texts.items())
    name = rows[0][1].name
    with_clean = {_shown(clean[k][name]) for k, _ in rows if name in clean[k]}
    if with_clean and with_clean != set(texts):
        cell += f"; {', '.join(sorted(with_clean))} with `clean`"
    return cell


def parameter_defaults() -> dict[str, str]:
    """Each parameter's default in words, every family's where they differ (``unusual fit --help``)."""
    from .registry import family, kinds

    clean = {k: family(k).clean_defaults for k in kinds()}
    members: dict[str, list[tuple[str, Parameter]]] = {}
    for kind in kinds():
        for p in tree(kind):
            members.setdefault(p.name, []).append((kind, p))
    return {name: _default_cell(rows, clean).replace("`", "") for name, rows in sorted(members.items())}


def parameter_table() -> str:
    """The README's parameter table (markdown): one row per parameter and meaning. A model parameter
    that several families declare with the same meaning has one row, its group naming them."""
    from .registry import family, kinds

    clean = {k: family(k).clean_defaults for k in kinds()}
    rows: dict[tuple[str, str, str], list[tuple[str, Parameter]]] = {}
    for group in ("features", "model", "train", "threshold"):
        for kind in kinds():
            for p in tree(kind):
                if p.group == group:
                    rows.setdefault((group, p.name, p.help), []).append((kind, p))
    lines = ["| group | parameter | default | meaning |", "|---|---|---|---|"]
    last = None
    for (group, name, help_), members in rows.items():
        title = " / ".join(k for k, _ in members) if group == "model" else _GROUP_TITLES[group]
        lines.append(f"| {'' if title == last else title} | `{name}` | {_default_cell(members, clean)} | {help_} |")
        last = title
    return "\n".join(lines) + "\n"
