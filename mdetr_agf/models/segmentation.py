"""PhraseCut's mask branch: per-query attention maps over the image memory, upsampled by a
small FPN-style convolutional head (group norm), as in DETR's panoptic head."""
import torch
import torch.nn.functional as F
from torch import nn

from .attention import split_heads
from ..ops import Add, MatMul


class MHAttentionMap(nn.Module):
    """Softmax of (query · key) per head over the H×W image grid; no values are mixed.

    The keys are the image memory read as H·W tokens (the original's 1×1 convolution with
    ``k_linear``'s weight is the same map), so every step is a module explainers can hook.
    """

    def __init__(self, query_dim, hidden_dim, heads):
        super().__init__()
        self.heads, self.hidden_dim = heads, hidden_dim
        self.q_linear = nn.Linear(query_dim, hidden_dim)
        self.k_linear = nn.Linear(query_dim, hidden_dim)
        self.scores = MatMul(scale=float(hidden_dim / heads) ** -0.5)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, q, memory, mask):
        """q: (batch, queries, dim); memory: (batch, dim, h, w); mask: (batch, h, w), True on padding."""
        n, _, h, w = memory.shape
        q = split_heads(self.q_linear(q), self.heads)
        k = split_heads(self.k_linear(memory.flatten(2).transpose(1, 2)), self.heads)
        scores = self.scores(q, k.transpose(-2, -1)).masked_fill(mask.flatten(1)[:, None, None], float("-inf"))
        return self.softmax(scores).view(n, self.heads, -1, h, w).transpose(1, 2)


class MaskHeadSmallConv(nn.Module):
    """conv-GN-ReLU stages; after the second, third and fourth, add an adapted backbone map."""

    def __init__(self, dim, fpn_dims, context_dim):
        super().__init__()
        inter = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        for i in range(5):
            setattr(self, f"lay{i + 1}", nn.Conv2d(inter[max(i - 1, 0)], inter[i], 3, padding=1))
            setattr(self, f"gn{i + 1}", nn.GroupNorm(8, inter[i]))
        self.out_lay = nn.Conv2d(inter[4], 1, 3, padding=1)
        for i in range(3):
            setattr(self, f"adapter{i + 1}", nn.Conv2d(fpn_dims[i], inter[i + 1], 1))
        self.relus = nn.ModuleList(nn.ReLU() for _ in range(5))
        self.adds = nn.ModuleList(Add() for _ in range(3))

    def forward(self, x, box_maps, fpns):
        queries = box_maps.shape[1]
        x = torch.cat([x.repeat_interleave(queries, 0), box_maps.flatten(0, 1)], 1)
        for i in range(5):
            if i >= 2:
                fpn = getattr(self, f"adapter{i - 1}")(fpns[i - 2]).repeat_interleave(queries, 0)
                x = self.adds[i - 2](fpn, F.interpolate(x, size=fpn.shape[-2:], mode="nearest"))
            x = self.relus[i](getattr(self, f"gn{i + 1}")(getattr(self, f"lay{i + 1}")(x)))
        return self.out_lay(x)
