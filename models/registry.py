"""The model registry: the one truth about a model family, one line per family.

A family is a ``torch.nn.Module`` subclass with a config dataclass. It is built
as ``Module(config, width)`` (``width`` = columns of the encoded feature matrix)
and implements the scoring contract of :class:`unusual.models.base.AnomalyModule`.
Whether it scores sequences (windows per entity) or single rows is said here
and nowhere else: the batch job, the endpoint and the CLI ask the registry.

Entries name their classes as ``"module:Class"`` strings, imported on first
use, so that reading the registry (which kinds exist, which are sequence
families) never loads PyTorch: the CLI and the drivers of the Ray jobs stay
light. A new family is one file plus one line below; the conformance tests run
over every entry.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


def _resolve(ref):
    if not isinstance(ref, str):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ModelFamily:
    kind: str
    module_ref: object  # the nn.Module class, or "package.module:Class"
    config_ref: object  # the config dataclass, or "package.module:Class"
    sequence: bool = False
    # Values of config fields added after bundles were first written, for
    # manifests that lack them (what those bundles were trained with).
    absent: dict = field(default_factory=dict)
    title: str = ""  # what the family is, in words (reports, model cards)
    # Parameters this family trains with unless the user gives them, where they differ from the config
    # classes' defaults: for data as users have it (anomalies included), and with ``clean=True``.
    train_defaults: dict = field(default_factory=dict)
    clean_defaults: dict = field(default_factory=dict)

    @property
    def module(self) -> type:
        return _resolve(self.module_ref)

    @property
    def config(self) -> type:
        return _resolve(self.config_ref)

    def stored_config(self, stored: dict):
        """The config of a stored manifest's ``model_config``."""
        return self.config(**{**self.absent, **stored})


REGISTRY: dict[str, ModelFamily] = {}


def register(
    kind: str,
    module,
    config,
    sequence: bool = False,
    absent: dict | None = None,
    title: str = "",
    train_defaults: dict | None = None,
    clean_defaults: dict | None = None,
) -> None:
    """Add a family: ``module`` and ``config`` are classes or ``"module:Class"`` strings."""
    REGISTRY[kind] = ModelFamily(
        kind, module, config, sequence, dict(absent or {}), title or kind, dict(train_defaults or {}),
        dict(clean_defaults or {}),
    )


def family(kind: str) -> ModelFamily:
    try:
        return REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(REGISTRY)}") from None


def kinds() -> list[str]:
    return sorted(REGISTRY)


DEFAULT_KIND = "ae"

# ---------------------------------------------------------------- the built-in families
# AE and VAE bundles written before ``norm`` existed had no normalisation layers; AE bundles written
# before ``score`` scored by reconstruction alone. On data as users have it (anomalies included) the
# AE and VAE train at most 20 epochs, stopping after 3 without improvement, with a trimmed loss: trained
# longer they learn to reconstruct the anomalies they are shown. With ``clean=True`` they train as long
# as clean data rewards, without trimming (benchmarks/README.md, "Data as users have it").
CLEAN = {"trim": 0.0, "epochs": 60, "patience": 8}
register("ae", "unusual.models.ae:AutoEncoder", "unusual.models.ae:AEConfig",
         absent={"norm": None, "score": "reconstruction"}, title="autoencoder",
         train_defaults={"epochs": 20, "patience": 3}, clean_defaults=CLEAN)
register("vae", "unusual.models.vae:VAE", "unusual.models.vae:VAEConfig", absent={"norm": None},
         title="variational autoencoder", train_defaults={"epochs": 20, "patience": 3}, clean_defaults=CLEAN)
# LSTM bundles written before ``score_steps`` scored each row by its own step's error alone, and those
# written before ``score_lookahead`` by the steps up to the row only.
register("lstm", "unusual.models.lstm:LSTMDetector", "unusual.models.lstm:LSTMConfig", sequence=True,
         absent={"score_steps": 1, "score_lookahead": 0}, title="LSTM sequence model")
