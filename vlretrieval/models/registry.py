"""Registry of model families, keyed by name.

Family modules call :func:`register_family` when imported. The built-in ones are imported lazily on
the first lookup, because they pull in paddlenlp, which takes seconds to import and is not needed by
callers that only list names or validate a config.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass

from ..errors import ConfigError
from .base import CROSS_ENCODER, DUAL_ENCODER, KINDS, ModelFamily


@dataclass(frozen=True)
class FamilySpec:
    """What the workflow must know of a built-in family without importing it (the Snakefile is
    parsed by every job, and the family modules import paddlenlp, which takes seconds)."""

    module: str  # registers the family on import
    kind: str
    extra_inputs: tuple[str, ...] = ()  # serialized data besides the LMDB split (ModelFamily.extra_inputs)


BUILTIN_FAMILIES: dict[str, FamilySpec] = {
    "ernie_vil": FamilySpec("vlretrieval.models.ernie_vil", DUAL_ENCODER),
    "chinese_clip": FamilySpec("vlretrieval.models.chinese_clip", DUAL_ENCODER),
    "bert_clip": FamilySpec("vlretrieval.models.bert_clip", DUAL_ENCODER),
    "vinvl": FamilySpec("vlretrieval.models.vinvl", CROSS_ENCODER, ("regions",)),
    "bridgetower": FamilySpec("vlretrieval.models.bridgetower", CROSS_ENCODER),
}
BUILTIN_FAMILY_MODULES: tuple[str, ...] = tuple(spec.module for spec in BUILTIN_FAMILIES.values())

_FAMILIES: dict[str, ModelFamily] = {}
_lock = threading.RLock()
_builtins_loaded = False


def register_family(family: ModelFamily, *, replace: bool = False) -> ModelFamily:
    """Add ``family`` under ``family.name``; a second family with the same name is an error unless ``replace``."""
    if not isinstance(family, ModelFamily):
        raise TypeError(f"expected a ModelFamily, got {type(family).__name__}")
    with _lock:
        existing = _FAMILIES.get(family.name)
        if existing is not None and existing is not family and not replace:
            raise ValueError(f"model family {family.name!r} is already registered")
        _FAMILIES[family.name] = family
    return family


def _load_builtins() -> None:
    global _builtins_loaded
    with _lock:
        if _builtins_loaded:
            return
        for module in BUILTIN_FAMILY_MODULES:
            importlib.import_module(module)
        for name, spec in BUILTIN_FAMILIES.items():
            family = _FAMILIES.get(name)
            if family is None or family.kind != spec.kind or tuple(family.extra_inputs) != spec.extra_inputs:
                raise RuntimeError(f"built-in family {name!r} does not match its FamilySpec {spec}")
        _builtins_loaded = True


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name``; raises :class:`ConfigError` listing the known names."""
    _load_builtins()
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES)) or "none"
        raise ConfigError(f"unknown model family {name!r} (registered: {known})") from None


def family_spec(name: str) -> FamilySpec:
    """The :class:`FamilySpec` of family ``name``: from the built-in table when it is there (no
    import), else from the registered family itself."""
    spec = BUILTIN_FAMILIES.get(name)
    if spec is not None:
        return spec
    family = get_family(name)
    return FamilySpec(type(family).__module__, family.kind, tuple(family.extra_inputs))


def list_families(kind: str | None = None) -> list[str]:
    """Sorted names of registered families, optionally only those of one ``kind``."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _load_builtins()
    return sorted(name for name, family in _FAMILIES.items() if kind is None or family.kind == kind)
