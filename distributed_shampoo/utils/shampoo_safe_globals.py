"""Lets torch.load(..., weights_only=True) read optimizer.state_dict() (issue 16 item 5).

The state dict's param groups hold this package's config dataclasses (grafting, precision,
root-inverse configs). weights_only=True unpickles only allow-listed classes, so the config
classes are registered as safe globals when the package is imported: they are plain data
(fields of numbers, bools and torch dtypes) whose construction runs no user code.
"""

import torch

from distributed_shampoo import matrix_functions_types, shampoo_types


def config_classes() -> list[type]:
    """Every dataclass of the two config modules (what param groups can hold)."""
    found = []
    for module in (shampoo_types, matrix_functions_types):
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == module.__name__ and hasattr(
                value, "__dataclass_fields__"
            ):
                found.append(value)
    return found


def register() -> None:
    torch.serialization.add_safe_globals(config_classes())
