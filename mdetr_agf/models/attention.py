"""Multi-head attention with its products exposed as modules.

Holds the parameters under ``torch.nn.MultiheadAttention``'s names (``in_proj_weight``,
``in_proj_bias``, ``out_proj``) so the checkpoints load unchanged, but computes every step
through a child module — projections, Q·Kᵀ, softmax, A·V — so explainers can read the
attention probabilities and carry relevance through both operands of each product.
Inputs are batch-first: (batch, length, dim).
"""
import torch
from torch import nn

from ..ops import MatMul, Project


def split_heads(x, heads):
    n, length, dim = x.shape
    return x.view(n, length, heads, dim // heads).transpose(1, 2)


def merge_heads(x):
    n, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * head_dim)


class MultiheadAttention(nn.Module):
    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.q_proj, self.k_proj, self.v_proj = Project(), Project(), Project()
        self.scores = MatMul(scale=(dim // heads) ** -0.5)
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(dropout)
        self.context = MatMul()
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query, key, value, key_padding_mask=None):
        """key_padding_mask: (batch, key length), True where the key is padding."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = split_heads(self.q_proj(query, w_q, b_q), self.heads)
        k = split_heads(self.k_proj(key, w_k, b_k), self.heads)
        v = split_heads(self.v_proj(value, w_v, b_v), self.heads)
        scores = self.scores(q, k.transpose(-2, -1))
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        attn = self.dropout(self.softmax(scores))
        return self.out_proj(merge_heads(self.context(attn, v)))
