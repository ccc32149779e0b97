"""CombinedLinear and get_device_mesh (SPEC B §1.7, §12 shampoo_model_utils_test)."""

import itertools
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed_shampoo.utils import shampoo_dist_utils
from distributed_shampoo.utils.shampoo_model_utils import CombinedLinear


@pytest.mark.parametrize(
    "in_features,out_features,bias,seed",
    [(i, o, b, s) for i, o in itertools.product((2, 10), (2, 10)) for b in (True, False) for s in (0, 1)],
)
def test_combined_linear_matches_nn_linear(in_features, out_features, bias, seed) -> None:
    torch.manual_seed(seed)
    reference = nn.Linear(in_features, out_features, bias=bias)
    torch.manual_seed(seed)
    combined = CombinedLinear(in_features, out_features, bias=bias)
    # Same initialisation under the same seed: the weight columns, then the bias column.
    expected = reference.weight if not bias else torch.cat([reference.weight, reference.bias[:, None]], 1)
    torch.testing.assert_close(combined.combined_weight, expected, rtol=0, atol=0)
    x = torch.randn(3, in_features)
    reference(x).pow(2).sum().backward()
    combined(x).pow(2).sum().backward()
    torch.testing.assert_close(combined(x), reference(x))
    grad = reference.weight.grad if not bias else torch.cat([reference.weight.grad, reference.bias.grad[:, None]], 1)
    torch.testing.assert_close(combined.combined_weight.grad, grad)


def test_combined_linear_repr() -> None:
    assert CombinedLinear(3, 4).extra_repr() == (
        "self.in_features=3, self.out_features=4, self.in_features_with_bias=4"
    )
    assert CombinedLinear(3, 4, bias=False).extra_repr() == (
        "self.in_features=3, self.out_features=4, self.in_features_with_bias=3"
    )


def test_get_device_mesh_builds_once(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with mock.patch.object(shampoo_dist_utils, "DeviceMesh", wraps=shampoo_dist_utils.DeviceMesh) as built:
            first = shampoo_dist_utils.get_device_mesh("cpu", ((0,),), ("replicate", "shard"))
            again = shampoo_dist_utils.get_device_mesh("cpu", [[0]], ["replicate", "shard"])
        assert first is again
        assert built.call_count == 1
        assert first.mesh_dim_names == ("replicate", "shard") and first.mesh.tolist() == [[0]]
    finally:
        shampoo_dist_utils._cached_mesh.cache_clear()
        dist.destroy_process_group()
