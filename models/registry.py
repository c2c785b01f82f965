"""The model registry: one line per model family.

A family is a ``torch.nn.Module`` subclass with a config dataclass. It is built
as ``Module(config, width)`` (``width`` = columns of the encoded feature matrix)
and implements the scoring contract of :class:`models.base.AnomalyModule`.
The conformance tests run over every entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    kind: str
    module: type
    config: type
    sequence: bool


REGISTRY: dict[str, ModelFamily] = {}


def register(kind: str, module: type, config: type, sequence: bool = False) -> None:
    REGISTRY[kind] = ModelFamily(kind, module, config, sequence)


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
