"""The ``unusual`` command line: one subcommand per job, its flags derived from the job's config.

    unusual fit       train one detector in this process and write its bundle        (FitJob)
    unusual train     distributed training on Ray (Ray Data + Ray Train)              (TrainJob)
    unusual score     batch scoring with Ray Data: Parquet in, scores + quarantine out (ScoreJob)
    unusual evaluate  metrics and a report from scored data with labels               (EvaluateJob)
    unusual serve     the Ray Serve endpoint: online JSON and bulk Arrow / Parquet     (ServeJob)
    unusual info      print a bundle's manifest summary
    unusual demo      the whole system on shipped real data: local S3 + Ray, train, score, serve

The flags of each command are the fields of its config class in :mod:`unusual.config` (run
``unusual <command> --help``); the command builds the config and hands it to the job's
``command(job)``. Model parameters come from ``--config`` (a YAML mapping of Detector parameters),
the shortcut flags and ``--param key=value``, in that order. Credentials for object storage come
from the standard AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` …), never from flags.

This module is the top layer: nothing in ``unusual`` imports it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from . import __version__
from .config import JOBS, VERBOSE_HELP, JobConfig, opt, run_parsed

# command -> (the function that runs its config, help). The function is looked up when the
# command runs, so that only the chosen command's modules (Ray, PyTorch) are imported.
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("unusual.ray_jobs.fit:command", "train one detector in this process and write its checkpoint bundle"),
    "train": ("unusual.ray_jobs.train:command", "distributed training with Ray Data + Ray Train; writes a bundle"),
    "score": ("unusual.ray_jobs.score:command", "batch-score Parquet data with Ray Data; writes scores + quarantine"),
    "evaluate": ("unusual.ray_jobs.evaluate:command", "ROC-AUC, PR-AUC, F1, VUS-PR and an HTML report from scores"),
    "serve": ("unusual.serving.app:serve_forever", "start the Ray Serve endpoint (online + bulk scoring)"),
    "info": ("unusual.cli:info", "print a checkpoint bundle's manifest summary"),
    "demo": ("unusual.demo:command", "the whole system on shipped data: local S3 + Ray, train, score, serve"),
}


class InfoCommand(JobConfig):
    """Print a checkpoint bundle's manifest summary."""

    checkpoint: str = opt(help="bundle URI", flags=["checkpoint"])


class DemoCommand(JobConfig):
    """The whole system on shipped real data."""

    workdir: str = opt("artifacts/demo", "where the artefacts are copied at the end")
    quick: bool = opt(False, "fewer epochs (a smoke run)")


CONFIGS: dict[str, type[JobConfig]] = {**JOBS, "info": InfoCommand, "demo": DemoCommand}


def function_of(command: str):
    module, _, name = COMMANDS[command][0].partition(":")
    return getattr(importlib.import_module(module), name)


def info(job: InfoCommand) -> int:
    from .models.bundle import read_bundle

    m = read_bundle(job.checkpoint)[0]
    summary = {
        "model_version": m.model_version,
        "kind": m.kind,
        "format_version": m.format_version,
        "model_config": m.family_config,
        "features": [f"{c['name']} ({c['kind']})" for c in m.features["columns"]],
        "threshold": m.threshold.model_dump(exclude_unset=True),
        "training": m.training.model_dump(include={"rows", "best_epoch", "seconds", "runner"}),
        "libraries": m.libraries,
    }
    print(json.dumps(summary, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # No abbreviated flags anywhere: ``--keep`` must not silently mean ``--keep-columns`` in a manifest.
    parser = argparse.ArgumentParser(
        prog="unusual", description="Deep-learning anomaly detection at cluster scale.", allow_abbrev=False
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    parser.add_argument("--version", action="version", version=f"unusual {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help) in COMMANDS.items():
        cls = CONFIGS[name]
        p = sub.add_parser(name, help=help, description=cls.__doc__, allow_abbrev=False)
        # `unusual train … -v` as well as `unusual -v train …`
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        cls.add_arguments(p)
        if {"-h", "--help"} & set(sys.argv[1:]):  # the keys need every family (and PyTorch): only for --help
            _parameter_help(p)
    return parser


def _parameter_help(p: argparse.ArgumentParser) -> None:
    """A Detector parameter's flag says its default; ``--param`` lists every key with its default (from the
    parameter tree, :mod:`unusual.models.params`)."""
    from .models.params import parameter_defaults

    defaults = parameter_defaults()
    for action in p._actions:
        if "--param" in action.option_strings:
            keys = "; ".join(f"{k} ({v})" for k, v in defaults.items())
            action.help = f"{action.help}. Keys (default): {keys}"
        elif action.dest in defaults and "default" not in (action.help or ""):
            action.help = f"{action.help} (default: {defaults[action.dest]})"


def parameter_keys() -> list[str]:
    """Every Detector parameter of every family (``--param KEY=VALUE``; README's parameter table)."""
    from .models.params import parameter_keys as keys

    return keys()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # bare `unusual`: what it can do
        parser.print_help()
        return 0
    ns = parser.parse_args(argv)
    return run_parsed(ns.command, CONFIGS[ns.command], ns, lambda job: function_of(ns.command)(job))


if __name__ == "__main__":
    sys.exit(main())
