"""Parameter-free operations as modules.

MDETR's residual sums, position-encoding additions, attention products and projections
by packed weights are plain tensor operations in the original code. Making each one a
module (with no parameters, so state-dict names are untouched) lets explainers attach
hooks to them without forking the model: a forward hook sees the operands, and a rule
can redistribute relevance among them.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Add(nn.Module):
    """a + b (residual sums, position encodings added to queries and keys)."""

    def forward(self, a, b):
        return a + b


class MatMul(nn.Module):
    """scale · (a @ b) (the two attention products: Q·Kᵀ/√d and A·V).

    The constant lives inside the module so that relevance passing through it is not
    rescaled by a bare multiplication that no rule sees.
    """

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def forward(self, a, b):
        out = torch.matmul(a, b)
        return out * self.scale if self.scale != 1.0 else out

    def extra_repr(self):
        return f"scale={self.scale:.4g}" if self.scale != 1.0 else ""


class Project(nn.Module):
    """x·Wᵀ + b with a weight owned elsewhere (a slice of attention's packed ``in_proj_weight``)."""

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)
