"""The format registry: every format is defined once, here looked up by name."""

from __future__ import annotations

from ..errors import UnsupportedInputError
from .base import Format

__all__ = ["format_names", "formats_in_family", "get_format", "register_format"]

_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add a format instance; a second format under the same name is a programming error and refused loudly."""
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered ({_FORMATS[fmt.name]!r})")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The format named `name`; unknown names fail closed with the list of what is supported."""
    try:
        return _FORMATS[name.lower()]
    except KeyError:
        known = ", ".join(sorted(_FORMATS))
        raise UnsupportedInputError(f"unknown quantization format {name!r}; supported formats: {known}") from None


def format_names() -> list[str]:
    return list(_FORMATS)


def formats_in_family(family: str) -> list[Format]:
    return [f for f in _FORMATS.values() if f.family == family]
