"""The toy MDETR's configuration, tokenizer and initialization, and the ShapesWorld seed ranges
that keep training, validation and held-out evaluation apart."""
from __future__ import annotations

from torch import nn

from .. import shapesworld
from ..models.build import ModelConfig
from ..models.text_encoder import TextConfig
from ..text import train_tokenizer

#: Side of the (square) ShapesWorld images the toy model is trained and run at.
TOY_INPUT_SIZE = 160
#: The bundled tokenizer's folder, relative to the package directory.
TOY_TOKENIZER = "assets/toy/tokenizer"
#: Scene seeds the toy model may train on; held-out evaluation uses seeds >= EVAL_SEED_START.
TRAIN_SEEDS = range(0, 100_000)
EVAL_SEED_START = 1_000_000
#: Scenes for watching training (and choosing its options), apart from both of the above.
VALIDATION_SEED_START = 500_000


def toy_config(vocab_size: int, tokenizer: str | None = TOY_TOKENIZER, backbone: str = "small_cnn",
               enc_layers: int = 2, dec_layers: int = 2) -> ModelConfig:
    """The toy MDETR: small CNN, 64-wide transformer (2+2 layers by default), 2-layer RoBERTa, 8 queries."""
    return ModelConfig(backbone=backbone, text_encoder="toy", num_queries=8, hidden_dim=64, nheads=4,
                       enc_layers=enc_layers, dec_layers=dec_layers, dim_feedforward=128,
                       text_config=TextConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=128,
                                              max_position_embeddings=64),
                       tokenizer=tokenizer)


def toy_tokenizer():
    """A byte-level BPE tokenizer (RoBERTa's conventions) in which every ShapesWorld word is one token.

    Trained on the words of :func:`shapesworld.vocabulary`, each alone (a caption's first word)
    and after a space (every other word), until no merge is left; a pure function of the
    vocabulary, so it is the same on every machine.
    """
    words = shapesworld.vocabulary()
    texts = [" ".join(words), " ".join(reversed(words))] * 4 + [w for w in words for _ in range(4)]
    return train_tokenizer(texts, vocab_size=1000, min_frequency=1)


def init_weights(model: nn.Module) -> nn.Module:
    """He initialization for the backbone's convolutions (they have no normalization to rescue
    a shrinking signal); everything else keeps PyTorch's defaults, as DETR does."""
    for m in model.backbone.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model
