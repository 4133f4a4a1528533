"""Principle sets (YAML) and their one loader."""

from principles.schema import (
    Principle,
    PrincipleSet,
    PrincipleSetError,
    builtin_names,
    load_builtin_sets,
    load_principle_set,
    parse_principle_set,
)

__all__ = [
    "Principle",
    "PrincipleSet",
    "PrincipleSetError",
    "builtin_names",
    "load_builtin_sets",
    "load_principle_set",
    "parse_principle_set",
]
