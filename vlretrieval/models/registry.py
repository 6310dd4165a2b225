"""Registry of model families, keyed by name.

A built-in family is one line of :data:`BUILTIN_FAMILIES`: its package, its kind and the serialized
data it reads besides the LMDB split. That line is the only place these facts are stated. The
workflow reads them from here without importing the family (the Snakefile is parsed by every job,
and a family package imports paddle and paddlenlp, which takes seconds); the family object reads
its ``kind`` and ``extra_inputs`` from here too, and registration checks that its model class
implements the interface of that kind.

Family packages call :func:`register_family` when imported; the built-in ones are imported on the
first lookup. This module imports nothing else of the package, so every layer may use it.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

DUAL_ENCODER = "dual_encoder"
CROSS_ENCODER = "cross_encoder"
KINDS = (DUAL_ENCODER, CROSS_ENCODER)


@dataclass(frozen=True)
class FamilySpec:
    """What the workflow must know of a family without importing it."""

    module: str  # the package that registers the family on import
    kind: str  # DUAL_ENCODER or CROSS_ENCODER
    # Serialized data besides the LMDB split that training and evaluation read: "regions" (detector
    # region features and tags, vlretrieval.data.regions) or nothing.
    extra_inputs: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"family module {self.module}: kind must be one of {KINDS}, got {self.kind!r}")


BUILTIN_FAMILIES: dict[str, FamilySpec] = {
    "ernie_vil": FamilySpec("vlretrieval.models.ernie_vil", DUAL_ENCODER),
    "chinese_clip": FamilySpec("vlretrieval.models.chinese_clip", DUAL_ENCODER),
    "bert_clip": FamilySpec("vlretrieval.models.bert_clip", DUAL_ENCODER),
    "vinvl": FamilySpec("vlretrieval.models.vinvl", CROSS_ENCODER, extra_inputs=("regions",)),
    "bridgetower": FamilySpec("vlretrieval.models.bridgetower", CROSS_ENCODER),
}

_FAMILIES: dict[str, Any] = {}
_SPECS: dict[str, FamilySpec] = dict(BUILTIN_FAMILIES)
_lock = threading.RLock()
_builtins_loaded = False


def register_family(family: Any, *, spec: FamilySpec | None = None, replace: bool = False) -> Any:
    """Add ``family`` (a :class:`~vlretrieval.models.base.ModelFamily`) under ``family.name``.

    A built-in family takes its line of :data:`BUILTIN_FAMILIES`. Any other family may pass its
    ``spec``; without one it is a family of the kind its model class implements, with no extra
    inputs. A second family under one name is an error unless ``replace``.
    """
    with _lock:
        if spec is None:
            spec = _SPECS.get(family.name) or FamilySpec(type(family).__module__, family.implemented_kind())
        elif family.name in BUILTIN_FAMILIES and spec != BUILTIN_FAMILIES[family.name]:
            raise ValueError(f"{family.name!r} is a built-in family; its spec is {BUILTIN_FAMILIES[family.name]}")
        implemented = family.implemented_kind()
        if implemented != spec.kind:
            raise ValueError(
                f"family {family.name!r} is registered as a {spec.kind}, but its model class "
                f"{family.model_class.__name__} implements a {implemented}"
            )
        existing = _FAMILIES.get(family.name)
        if existing is not None and existing is not family and not replace:
            raise ValueError(f"model family {family.name!r} is already registered")
        _FAMILIES[family.name] = family
        _SPECS[family.name] = spec
    return family


def _load_builtins() -> None:
    global _builtins_loaded
    with _lock:
        if _builtins_loaded:
            return
        for name, spec in BUILTIN_FAMILIES.items():
            importlib.import_module(spec.module)
            if name not in _FAMILIES:
                raise RuntimeError(f"{spec.module} does not register the built-in family {name!r}")
        _builtins_loaded = True


def get_family(name: str) -> Any:
    """The family registered as ``name``; raises :class:`ConfigError` listing the known names."""
    _load_builtins()
    try:
        return _FAMILIES[name]
    except KeyError:
        known = ", ".join(sorted(_FAMILIES)) or "none"
        raise ConfigError(f"unknown model family {name!r} (registered: {known})") from None


def family_spec(name: str) -> FamilySpec:
    """The :class:`FamilySpec` of family ``name``; a built-in one is answered without importing it."""
    spec = _SPECS.get(name)
    if spec is None:
        get_family(name)  # imports the built-ins, or raises ConfigError naming the known families
        spec = _SPECS[name]
    return spec


def list_families(kind: str | None = None) -> list[str]:
    """Sorted names of registered families, optionally only those of one ``kind``."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    _load_builtins()
    return sorted(name for name in _FAMILIES if kind is None or _SPECS[name].kind == kind)
