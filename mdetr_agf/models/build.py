"""Architecture families: a name → a configuration → a model, without weights.

The eight families are the eight distinct state-dict layouts of the published checkpoints;
every Zenodo file belongs to one (see ``checkpoints.json``).
"""
from dataclasses import asdict, dataclass

from .backbone import Joiner, PositionEmbeddingSine, build_backbone
from .mdetr import MDETR, MDETRSegmentation
from .text_encoder import TEXT_CONFIGS, TextConfig, TextEncoder
from .transformer import Transformer


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet101"
    text_encoder: str = "roberta-base"
    num_queries: int = 100
    qa_dataset: str | None = None
    contrastive_align: bool = True
    masks: bool = False
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    text_config: TextConfig | None = None  # None: the named encoder's standard configuration
    tokenizer: str | None = None  # a hub name or a local folder; None: the text encoder's name

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        if d.get("text_config") is not None:
            d["text_config"] = TextConfig(**d["text_config"])
        return cls(**d)


_EB3, _EB5 = "timm_tf_efficientnet_b3_ns", "timm_tf_efficientnet_b5_ns"
FAMILIES = {
    "mdetr_resnet101": ModelConfig(),
    "mdetr_efficientnetB3": ModelConfig(backbone=_EB3),
    "mdetr_efficientnetB5": ModelConfig(backbone=_EB5),
    "mdetr_clevr": ModelConfig(backbone="resnet18", text_encoder="distilroberta-base", num_queries=25,
                               qa_dataset="clevr"),
    "mdetr_resnet101_gqa": ModelConfig(qa_dataset="gqa", contrastive_align=False),
    "mdetr_efficientnetB5_gqa": ModelConfig(backbone=_EB5, qa_dataset="gqa", contrastive_align=False),
    "mdetr_resnet101_phrasecut": ModelConfig(masks=True, contrastive_align=False),
    "mdetr_efficientnetB3_phrasecut": ModelConfig(backbone=_EB3, masks=True, contrastive_align=False),
}


def build_model(config: ModelConfig):
    """An MDETR (or its PhraseCut wrapper) in eval mode with uninitialized heads."""
    text_config = config.text_config or TEXT_CONFIGS[config.text_encoder]
    backbone = Joiner(build_backbone(config.backbone, return_interm_layers=config.masks),
                      PositionEmbeddingSine(config.hidden_dim // 2))
    transformer = Transformer(TextEncoder(text_config), dim=config.hidden_dim, heads=config.nheads,
                              enc_layers=config.enc_layers, dec_layers=config.dec_layers,
                              ffn=config.dim_feedforward)
    model = MDETR(backbone, transformer, config.num_queries, qa_dataset=config.qa_dataset,
                  contrastive_align=config.contrastive_align)
    model.config = config
    if config.masks:
        model = MDETRSegmentation(model)
        model.config = config
    return model.eval()


__all__ = ["FAMILIES", "ModelConfig", "build_model"]
