"""The model registry: one line per model family.

A family is a ``torch.nn.Module`` subclass with a config dataclass. It is built
as ``Module(config, width)`` (``width`` = columns of the encoded feature matrix)
and implements the scoring contract of :class:`models.base.AnomalyModule`.
The conformance tests run over every entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelFamily:
    kind: str
    module: type
    config: type
    sequence: bool
    # Values of config fields added after bundles were first written, for
    # manifests that lack them (what those bundles were trained with).
    absent: dict = field(default_factory=dict)

    def stored_config(self, stored: dict):
        """The config of a stored manifest's ``model_config``."""
        return self.config(**{**self.absent, **stored})


REGISTRY: dict[str, ModelFamily] = {}


def register(kind: str, module: type, config: type, sequence: bool = False, absent: dict | None = None) -> None:
    REGISTRY[kind] = ModelFamily(kind, module, config, sequence, dict(absent or {}))


def family(kind: str) -> ModelFamily:
    _load_builtin()
    try:
        return REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {sorted(REGISTRY)}") from None


def kinds() -> list[str]:
    _load_builtin()
    return sorted(REGISTRY)


def _load_builtin() -> None:
    # Importing a family's file registers it.
    from models import ae, lstm, vae  # noqa: F401
