"""Exceptions and warnings raised by vpetl.

Every user-facing error says what was expected, what was found and how to fix it.
``VpetlError`` subclasses ``ValueError`` where the cause is a bad argument, so
``except ValueError`` keeps working for callers that validate input generically.
"""

from __future__ import annotations


class VpetlError(Exception):
    """Base class of every error vpetl raises on purpose."""


class ConfigError(VpetlError, ValueError):
    """A method, width, position, scale or other option is not accepted."""


class InjectionError(VpetlError):
    """A module could not be adapted, or an adapted branch is never called in forward."""


class DeltaFileError(VpetlError):
    """A delta file is missing, empty, truncated, not safetensors, or not a vpetl delta."""


class DeltaMismatchError(VpetlError):
    """A delta does not fit the model: other architecture, head, or injection config."""


class MergeError(VpetlError):
    """A branch cannot be folded into the frozen weights (it is nonlinear)."""


class ExportError(VpetlError):
    """An export or graph-capture route cannot reproduce the injected model; the message names
    the routes that do."""


class BaseWeightsWarning(UserWarning):
    """The delta was trained on other base weights than the ones it is loaded onto."""


def format_names(names, limit: int = 12) -> str:
    """Sorted, comma-separated, truncated listing of names for error messages."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown
