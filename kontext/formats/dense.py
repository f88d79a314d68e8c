"""Dense weights: bf16, fp16 or fp32, computing in the input's dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import ParamSpec, WeightFormat
from .layer import CastAtUse


class Linear(CastAtUse, nn.Linear):
    """A dense linear layer that computes in its input's dtype (its weight is cast at use only if it differs, so
    streamed or offloaded weights in another dtype still compute in the stated dtype)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_cast()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_branch(x, F.linear(x, self.cast_weight(self.weight, x), self.cast_bias(self.bias, x)))


class DenseFormat(WeightFormat):
    name = "dense"
    quantized = False
    bits = 16
    linear = Linear

    def params(self, out_features: int, in_features: int) -> dict[str, ParamSpec]:
        return {"weight": ((out_features, in_features), None)}


DENSE = DenseFormat()
Linear.format = DENSE
