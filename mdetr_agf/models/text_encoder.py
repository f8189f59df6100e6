"""RoBERTa / DistilRoBERTa text encoder, written out with the checkpoints' parameter names.

Why not ``transformers.RobertaModel``: its attention is fused (SDPA), which hides the
attention probabilities and the residual sums that explainers need, and its state dict
no longer carries ``embeddings.position_ids``. The weights live in every MDETR checkpoint,
so only the configuration is needed here — built locally, no hub access.
"""
from dataclasses import dataclass

import torch
from torch import nn

from .attention import merge_heads, split_heads
from ..ops import Add, MatMul


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    dropout: float = 0.1


TEXT_CONFIGS = {
    "roberta-base": TextConfig(),
    "distilroberta-base": TextConfig(num_hidden_layers=6),
}


class Embeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.padding_idx = c.pad_token_id
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size, padding_idx=c.pad_token_id)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.dropout)
        self.add_position, self.add_type = Add(), Add()

    def forward(self, input_ids):
        # RoBERTa counts positions from padding_idx + 1 and gives padding the padding position.
        not_pad = input_ids.ne(self.padding_idx).int()
        positions = (torch.cumsum(not_pad, dim=1) * not_pad).long() + self.padding_idx
        x = self.add_position(self.word_embeddings(input_ids), self.position_embeddings(positions))
        x = self.add_type(x, self.token_type_embeddings(torch.zeros_like(input_ids)))
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.scores = MatMul(scale=(c.hidden_size // c.num_attention_heads) ** -0.5)
        self.context = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, padding_mask):
        q = split_heads(self.query(x), self.heads)
        k, v = split_heads(self.key(x), self.heads), split_heads(self.value(x), self.heads)
        scores = self.scores(q, k.transpose(-2, -1))
        scores = scores.masked_fill(padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        return merge_heads(self.context(self.dropout(self.softmax(scores)), v))


class DenseAddNorm(nn.Module):
    """dense → dropout → LayerNorm(· + residual): RoBERTa's ``*.output`` blocks."""

    def __init__(self, in_dim, c):
        super().__init__()
        self.dense = nn.Linear(in_dim, c.hidden_size)
        self.dropout = nn.Dropout(c.dropout)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.add = Add()

    def forward(self, x, residual):
        return self.LayerNorm(self.add(self.dropout(self.dense(x)), residual))


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = DenseAddNorm(c.hidden_size, c)

    def forward(self, x, padding_mask):
        return self.output(self.self(x, padding_mask), x)


class Intermediate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.intermediate_act_fn = nn.GELU()

    def forward(self, x):
        return self.intermediate_act_fn(self.dense(x))


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = DenseAddNorm(c.intermediate_size, c)

    def forward(self, x, padding_mask):
        x = self.attention(x, padding_mask)
        return self.output(self.intermediate(x), x)


class LayerStack(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x, padding_mask):
        for layer in self.layer:
            x = layer(x, padding_mask)
        return x


class Pooler(nn.Module):
    """Present in every checkpoint; MDETR's outputs never use it."""

    def __init__(self, c):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden):
        return self.activation(self.dense(hidden[:, 0]))


class TextEncoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = LayerStack(config)
        self.pooler = Pooler(config)

    def forward(self, input_ids, attention_mask):
        """Returns the last hidden state (batch, tokens, hidden); attention_mask 1 on real tokens."""
        return self.encoder(self.embeddings(input_ids), attention_mask.eq(0))
