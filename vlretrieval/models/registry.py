"""Registry of model families, keyed by name.

Family modules call :func:`register_family` when imported. The built-in ones are imported lazily on
the first lookup, because they pull in paddlenlp, which takes seconds to import and is not needed by
callers that only list names or validate a config.
"""

from __future__ import annotations

import importlib
import threading

from ..errors import ConfigError
from .base import KINDS, ModelFamily

# Modules that register a built-in family on import.
BUILTIN_FAMILY_MODULES: tuple[str, ...] = ("vlretrieval.models.ernie_vil", "vlretrieval.models.chinese_clip", "vlretrieval.models.bert_clip")

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
        _builtins_loaded = True


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name``; raises :class:`ConfigError` listing the known names."""
    _load_builtins()
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES)) or "none"
        raise ConfigError(f"unknown model family {name!r} (registered: {known})") from None


def list_families(kind: str | None = None) -> list[str]:
    """Sorted names of registered families, optionally only those of one ``kind``."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _load_builtins()
    return sorted(name for name, family in _FAMILIES.items() if kind is None or family.kind == kind)
