"""Flat JSON keys for nested optimizer state (SPEC B §8.1), and back."""

import json
from typing import Any, Dict, List


def flatten(input_dict: Dict[Any, Any]) -> Dict[str, Any]:
    """{"a": {0: t}} -> {'["a", 0]': t}; empty sub-dicts vanish."""
    flat: Dict[str, Any] = {}

    def visit(prefix: List[Any], value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                visit(prefix + [key], sub)
        else:
            flat[json.dumps(prefix)] = value

    for key, value in input_dict.items():
        visit([key], value)
    return flat


def unflatten(flattened_dict: Dict[str, Any]) -> Dict[Any, Any]:
    """Inverse of flatten."""
    nested: Dict[Any, Any] = {}
    for flat_key, value in flattened_dict.items():
        path = json.loads(flat_key)
        if not isinstance(path, list) or not path:
            raise ValueError(f"Invalid flattened state key {flat_key!r}: not a JSON list.")
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return nested
