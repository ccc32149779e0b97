"""Flat JSON keys for nested optimizer state (SPEC B §8.1), and back."""

import json
from typing import Any


def flatten(input_dict: dict[Any, Any]) -> dict[str, Any]:
    """{"a": {0: t}} -> {'["a", 0]': t}; empty sub-dicts vanish."""
    flat: dict[str, Any] = {}

    def visit(prefix: list[Any], value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                visit(prefix + [key], sub)
        else:
            flat[json.dumps(prefix)] = value

    for key, value in input_dict.items():
        visit([key], value)
    return flat


def unflatten(flattened_dict: dict[str, Any]) -> dict[Any, Any]:
    """Inverse of flatten."""
    nested: dict[Any, Any] = {}
    for flat_key, value in flattened_dict.items():
        path = json.loads(flat_key)
        if not isinstance(path, list) or not path:
            raise ValueError(f"Invalid flattened state key {flat_key!r}: not a JSON list.")
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return nested
