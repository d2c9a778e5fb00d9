"""One file per method (see :mod:`vpetl.registry`). Importing this package registers them all:
every module here defines one method entry, decorated with ``@register``."""

from __future__ import annotations

import importlib
import pkgutil

from ..registry import REGISTRY

_FIRST = ("patt", "adapter", "lora", "prefix", "vpt", "tune", "bitfit", "full")  # vpetl 0.1.0's, in its order
_NAMES = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
for _name in [n for n in _FIRST if n in _NAMES] + sorted(set(_NAMES) - set(_FIRST)):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["REGISTRY"]
