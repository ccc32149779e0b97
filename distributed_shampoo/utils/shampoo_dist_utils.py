"""Process-group helpers of the reference API (SPEC B §1.7)."""

import functools
from collections.abc import Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh


def get_device_mesh(
    device_type: str, mesh: Sequence, mesh_dim_names: Sequence[str] | None = None
) -> DeviceMesh:
    """A DeviceMesh, built once per distinct (device_type, mesh, mesh_dim_names): constructing a
    mesh is collective and creates process groups, so repeated calls return the same object."""
    return _cached_mesh(device_type, _hashable(mesh), tuple(mesh_dim_names) if mesh_dim_names else None)


def _hashable(mesh: Sequence) -> tuple:
    if hasattr(mesh, "tolist"):
        mesh = mesh.tolist()
    return tuple(_hashable(m) if isinstance(m, (list, tuple)) else int(m) for m in mesh)


@functools.cache
def _cached_mesh(device_type: str, mesh: tuple, mesh_dim_names: tuple | None) -> DeviceMesh:
    return DeviceMesh(device_type, torch.tensor(mesh, dtype=torch.int64), mesh_dim_names=mesh_dim_names)
