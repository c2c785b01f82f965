"""The machinery of typed configuration: pydantic models whose fields are also CLI flags.

:class:`JobConfig` is the base of every job's config (:mod:`unusual.config`). Its fields become
flags (``--field-name``, help from the description, choices from a ``Literal``, ``--x/--no-x``
for booleans, repeated flags for lists and mappings); the strings argparse collects are validated
and converted by pydantic, never by hand; a validation error becomes one line naming the flag.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from .models.errors import UnusualError

TOKEN_ENV = "UNUSUAL_SERVE_TOKEN"  # the serving token, when no flag gives one


class ConfigError(UnusualError, ValueError):
    """A job's configuration is invalid; the message names the flag / field at fault."""


# --------------------------------------------------------------------------- value types


def _split_csv(value):
    """``"a,b"`` -> ``["a", "b"]``; a list passes through (each string in it split too)."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, (list, tuple)):
        return [p.strip() for v in value for p in (v.split(",") if isinstance(v, str) else [v]) if str(p).strip()]
    return value


def _key_values(value):
    """``["latent=8", "hidden=[32,16]"]`` (repeated ``--param``) -> ``{"latent": 8, "hidden": [32, 16]}``;
    the values are YAML scalars or lists, as in a ``--config`` file. A mapping passes through."""
    if isinstance(value, dict) or value is None:
        return value or {}
    out = {}
    for item in [value] if isinstance(value, str) else value:
        if "=" not in item:
            raise ValueError(f"expected key=value; got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"{key.strip()}: {raw!r} is not a YAML value ({getattr(e, 'problem', e)})") from None
    return out


def _name_uris(value):
    """Served models: ``{"ae": "s3://…"}``, ``"ae=s3://…,vae=/path"`` (as ``serve run`` passes it) or a
    list of ``NAME=URI`` (repeated ``--checkpoint``). Reads nothing: the command line names a bare URI
    by its bundle's kind first (:func:`named_checkpoints`)."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    out = {}
    for part in _split_csv(value):
        name, uri = _split_name(part)
        if not name:
            raise ValueError(f"{part!r} has no name: give it as NAME=URI")
        if name in out:
            raise ValueError(f"two models named {name!r} ({out[name]} and {uri}); name them NAME=URI")
        out[name] = uri
    return out


def _split_name(part: str) -> tuple[str, str]:
    """``NAME=URI`` -> (NAME, URI); a bare URI (an MLflow one may hold ``=``) -> ("", URI)."""
    from .tracking import is_mlflow_uri

    if "=" in part and not is_mlflow_uri(part):
        name, uri = (p.strip() for p in part.split("=", 1))
        return name, uri
    return "", part.strip()


def named_checkpoints(value) -> list[str]:
    """``[NAME=]URI`` parts with each bare URI named by its bundle's kind (its MLflow URI resolved first):
    what ``--checkpoint`` takes, done where the command runs, before the config is validated."""
    from .models.bundle import read_bundle
    from .tracking import resolve_checkpoint

    out = []
    for part in _split_csv(value) if isinstance(value, (str, list, tuple)) else []:
        name, uri = _split_name(part)
        if not name:
            try:
                uri = resolve_checkpoint(uri)
                name = read_bundle(uri)[0].kind
            except (UnusualError, OSError) as e:  # no bundle there, or storage refused: name the flag
                raise ConfigError(f"--checkpoint: {e}") from None
        out.append(f"{name}={uri}")
    return out


CSV = Annotated[list[str], BeforeValidator(_split_csv)]
KeyValues = Annotated[dict[str, Any], BeforeValidator(_key_values)]
NameURIs = Annotated[dict[str, str], BeforeValidator(_name_uris)]


def opt(
    default=..., help: str = "", *, flags: list[str] | None = None, cli: bool = True, choices=None, metavar=None, **kw
):
    """A field with its CLI help; ``flags`` overrides ``--field-name`` (a name without dashes is positional);
    ``choices`` (a list, or a function giving one) for the flag's help; ``cli=False`` keeps it off the CLI
    (testing hooks); other keywords are pydantic constraints (``ge=1`` …)."""
    extra = {"cli": cli}
    if flags:
        extra["flags"] = flags
    if choices is not None:
        extra["choices"] = choices
    if metavar:
        extra["metavar"] = metavar
    return Field(default, description=help, json_schema_extra=extra, **kw)


# --------------------------------------------------------------------------- the base class


class JobConfig(BaseModel):
    """Base of the job configs: strict about names, converting values, validating on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def cli_fields(cls) -> dict[str, Any]:
        return {n: f for n, f in cls.model_fields.items() if (f.json_schema_extra or {}).get("cli", True)}

    @classmethod
    def flags_of(cls, name: str) -> list[str]:
        extra = cls.model_fields[name].json_schema_extra or {}
        return list(extra.get("flags") or [f"--{name.replace('_', '-')}"])

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field. Flags not given stay out of the namespace, so the class's defaults
        (and its validators) decide, not argparse."""
        for name, f in cls.cli_fields().items():
            base, repeated = _base_type(f.annotation)
            kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
            help = f.description or ""
            if f.is_required():
                kw["required"] = True
            elif f.default not in (None, [], {}, False) and f.default is not ...:
                help += f" (default: {f.default})"
            if base is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif repeated:
                kw["action"] = "append"
            if get_origin(base) is Literal:
                kw["choices"] = list(get_args(base))
            choices = (f.json_schema_extra or {}).get("choices")
            if choices is not None:
                kw["choices"] = choices() if callable(choices) else list(choices)
            kw["help"] = help.replace("%", "%%")
            metavar = (f.json_schema_extra or {}).get("metavar") or _METAVARS.get(base)
            if metavar and "choices" not in kw and base is not bool:
                kw["metavar"] = metavar
            flags = cls.flags_of(name)
            if not flags[0].startswith("-"):  # a positional argument
                kw = {"help": kw["help"]}
            parser.add_argument(*flags, **kw)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace):
        values = {k: v for k, v in vars(ns).items() if k in cls.cli_fields()}
        return cls.validated(values)

    @classmethod
    def validated(cls, values: dict):
        """``cls(**values)``, with pydantic's errors turned into one line naming the flag."""
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise ConfigError(describe(cls, e)) from None


_METAVARS = {int: "N", float: "X"}


def _base_type(annotation) -> tuple[Any, bool]:
    """(the type without ``None``, whether the flag repeats) of a field annotation."""
    t = annotation
    if get_origin(t) is Annotated:
        t = get_args(t)[0]
    if get_origin(t) in (Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        t = args[0] if len(args) == 1 else t
    if get_origin(t) is Annotated:
        t = get_args(t)[0]
    return t, get_origin(t) in (list, dict)


def describe(cls: type[JobConfig], e: ValidationError) -> str:
    """The first error of a validation, as ``--flag: message``."""
    parts = []
    for err in e.errors():
        loc = err.get("loc") or ()
        name = str(loc[0]) if loc else ""
        where = cls.flags_of(name)[0] if name in cls.model_fields else (name or cls.__name__)
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        got = err.get("input")
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown argument {name!r}; known: {sorted(cls.model_fields)}")
            continue
        shown = f"; got {got!r}" if err.get("type") != "value_error" and not isinstance(got, dict) else ""
        parts.append(f"{where}: {msg}{shown}" if loc else f"{msg}")
    return "; ".join(parts)


USER_ERRORS = (UnusualError, FileNotFoundError, ValueError, TypeError)


def remote_cause(e: BaseException) -> BaseException | None:
    """The error a Ray task or actor raised, for the error Ray raises in the driver (a ``RayTaskError``,
    whose text is the whole remote traceback); None for any other error. (No Ray import: by name.)"""
    if any(k.__name__ == "RayTaskError" for k in type(e).__mro__):
        cause = getattr(e, "cause", None)
        return cause if isinstance(cause, BaseException) else None
    return None


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


STORAGE_MODULES = ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs", "urllib3", "requests", "aiohttp")


def infrastructure(e: BaseException) -> bool:
    """An error of the storage or the network (an outage, a timeout), not of the job's code."""
    return isinstance(e, (OSError, TimeoutError)) or type(e).__module__.split(".")[0] in STORAGE_MODULES


def guarded(command: str, fn) -> int:
    """Run ``fn()``; an error of the user's making is one line on stderr and exit status 2, not a
    traceback; so is one a Ray task or actor raised. An error of the storage or the network (an outage
    mid-job), here or in a Ray worker, is one line naming what failed, with exit status 1. Anything
    else is a bug: its traceback."""
    try:
        return fn()
    except BrokenPipeError:  # `unusual info … | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        cause = remote_cause(e)
        if cause is None and getattr(e, "actor_init_failed", False) is True:
            # A Ray actor whose constructor raised (an outage while it loads the bundle): Ray keeps only
            # the remote traceback's text, whose last line is the error.
            last = [line.strip() for line in str(e).strip().splitlines() if line.strip()][-1:]
            print(f"unusual {command}: error: in a starting Ray worker: {last[0] if last else e}", file=sys.stderr)
            return 1
        if cause is None and isinstance(e, USER_ERRORS):
            print(f"unusual {command}: error: {e}", file=sys.stderr)
            return 2
        err, where = (cause, "in a Ray worker: ") if cause is not None else (e, "")
        if infrastructure(err) or isinstance(err, USER_ERRORS):  # else a bug: its traceback
            kind = "" if isinstance(err, UnusualError) else f"{type(err).__name__}: "
            print(f"unusual {command}: error: {where}{kind}{one_line(err)}", file=sys.stderr)
            return 2 if isinstance(err, USER_ERRORS) and not infrastructure(err) else 1
        raise


def stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` of a running command (a job's driver) prints every thread's stack on its
    stderr (a job's log) and the command goes on: where a job that seems stuck is waiting."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        except (AttributeError, OSError, RuntimeError, ValueError):  # a stderr without a file descriptor
            pass


VERBOSE_HELP = "show Ray's own log lines and detailed progress (default: only unusual's progress and result)"


def run_parsed(command: str, cls: type[JobConfig], ns: argparse.Namespace, run) -> int:
    """What ``unusual <command>`` and ``python -m`` share once the flags are parsed: logging (``-v``),
    the config validated before the job's modules are imported, then ``run(config)``, guarded."""
    import logging

    from .runtime import filter_native_stderr, set_verbose

    set_verbose(ns.verbose)
    filter_native_stderr()
    stacks_on_sigusr1()
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.WARNING, format="%(message)s")
    return guarded(command, lambda: run(cls.from_namespace(ns)))
