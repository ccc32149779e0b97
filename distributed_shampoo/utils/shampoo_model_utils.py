"""CombinedLinear (SPEC B §1.7): a linear layer whose weight and bias are one parameter, so
Shampoo preconditions them together as one block."""

import math

import torch
from torch import nn


class CombinedLinear(nn.Module):
    """y = x W^T + b with [W | b] stored as `combined_weight`, shape (out, in + 1) (or
    (out, in) without bias); initialised like nn.Linear."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = bias
        self.in_features_with_bias = in_features + 1 if bias else in_features
        self.combined_weight = nn.Parameter(
            torch.empty(out_features, self.in_features_with_bias, device=device, dtype=dtype)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.combined_weight[:, : self.in_features], a=math.sqrt(5))
            if self.bias:
                bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
                nn.init.uniform_(self.combined_weight[:, -1], -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias:
            return nn.functional.linear(x, self.combined_weight[:, :-1], self.combined_weight[:, -1])
        return nn.functional.linear(x, self.combined_weight)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features=}, {self.out_features=}, "
            f"{self.in_features_with_bias=}"
        )
