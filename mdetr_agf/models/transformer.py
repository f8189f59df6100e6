"""MDETR's transformer: a post-norm encoder over [image tokens; text tokens] and a decoder.

Reads top to bottom as the data flows. Names match the checkpoints (``encoder.layers.i``,
``decoder.layers.i.cross_attn_image``, ``norm3``/``norm4``: the decoder's text cross-attention
was removed upstream before training, so ``norm2`` does not exist). Every residual sum and
position-encoding sum is an ``Add`` module, so explainers can see both operands.
"""
from torch import nn

from .attention import MultiheadAttention
from ..ops import Add


class EncoderLayer(nn.Module):
    def __init__(self, dim=256, heads=8, ffn=2048, dropout=0.1):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads, dropout)
        self.linear1, self.linear2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.activation = nn.ReLU()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout, self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.add_pos, self.add_attn, self.add_ffn = Add(), Add(), Add()

    def forward(self, src, pos, padding_mask):
        q = k = self.add_pos(src, pos)
        src = self.norm1(self.add_attn(src, self.dropout1(self.self_attn(q, k, src, padding_mask))))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(self.add_ffn(src, self.dropout2(ffn)))


class DecoderLayer(nn.Module):
    def __init__(self, dim=256, heads=8, ffn=2048, dropout=0.1):
        super().__init__()
        self.self_attn = MultiheadAttention(dim, heads, dropout)
        self.cross_attn_image = MultiheadAttention(dim, heads, dropout)
        self.linear1, self.linear2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.activation = nn.ReLU()
        self.norm1, self.norm3, self.norm4 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout, self.dropout1 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.dropout3, self.dropout4 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.add_query_pos_self, self.add_query_pos_cross, self.add_memory_pos = Add(), Add(), Add()
        self.add_self, self.add_cross, self.add_ffn = Add(), Add(), Add()

    def forward(self, tgt, query_pos, memory, memory_pos, memory_padding_mask):
        q = k = self.add_query_pos_self(tgt, query_pos)
        tgt = self.norm1(self.add_self(tgt, self.dropout1(self.self_attn(q, k, tgt))))
        cross = self.cross_attn_image(self.add_query_pos_cross(tgt, query_pos),
                                      self.add_memory_pos(memory, memory_pos), memory, memory_padding_mask)
        tgt = self.norm3(self.add_cross(tgt, self.dropout3(cross)))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm4(self.add_ffn(tgt, self.dropout4(ffn)))


class Encoder(nn.Module):
    def __init__(self, layers, **kw):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**kw) for _ in range(layers))

    def forward(self, src, pos, padding_mask):
        for layer in self.layers:
            src = layer(src, pos, padding_mask)
        return src


class Decoder(nn.Module):
    """Returns the normed output of every layer: the QA heads read the first, boxes the last."""

    def __init__(self, layers, dim=256, **kw):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, **kw) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt, query_pos, memory, memory_pos, memory_padding_mask):
        states = []
        for layer in self.layers:
            tgt = layer(tgt, query_pos, memory, memory_pos, memory_padding_mask)
            states.append(self.norm(tgt))
        return states


class FeatureResizer(nn.Module):
    """Maps text-encoder features (768) to the transformer width (256): fc → LayerNorm(1e-12)."""

    def __init__(self, in_dim, out_dim, dropout=0.1):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.layer_norm = nn.LayerNorm(out_dim, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.layer_norm(self.fc(x)))


class Transformer(nn.Module):
    """Holds the text encoder, the resizer, the joint encoder and the decoder."""

    def __init__(self, text_encoder, dim=256, heads=8, enc_layers=6, dec_layers=6, ffn=2048, dropout=0.1):
        super().__init__()
        self.d_model, self.nhead = dim, heads
        self.encoder = Encoder(enc_layers, dim=dim, heads=heads, ffn=ffn, dropout=dropout)
        self.decoder = Decoder(dec_layers, dim=dim, heads=heads, ffn=ffn, dropout=dropout)
        self.text_encoder = text_encoder
        self.resizer = FeatureResizer(text_encoder.config.hidden_size, dim, dropout)
