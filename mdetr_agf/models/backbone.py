"""Convolutional backbones with frozen batch norm, and the sine position encoding.

Parameter names follow the original checkpoints (``backbone.0.body.*``) so Zenodo files
load as they are. Two details decide whether outputs match the original:

* every batch norm is frozen with eps 1e-5 (also for ``tf_efficientnet_*``, whose native
  eps is 1e-3), because that is what the checkpoints were trained and published with;
* current timm fuses batch norm and its activation (``BatchNormAct2d``). Replacing that
  module by a plain frozen batch norm silently drops the activation — the reason upstream
  MDETR gives NaN or huge outputs on today's timm — so ours keeps the activation.
"""
import math

import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (eps 1e-5, as in MDETR)."""

    eps = 1e-5

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), fill))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Frozen statistics never count batches; older files may still carry the counter.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scale_and_shift(self):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x):
        scale, shift = self.scale_and_shift()
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """Frozen batch norm followed by the activation timm fused into its ``BatchNormAct2d``.

    The activation stays a child module so explainers can give it its own rule.
    """

    def __init__(self, num_features, act):
        super().__init__(num_features)
        self.act = act

    def forward(self, x):
        return self.act(super().forward(x))


def _freeze_timm_batch_norms(module):
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            act = getattr(child, "act", nn.Identity())
            frozen = FrozenBatchNormAct2d(child.num_features, act) if not isinstance(act, nn.Identity) \
                else FrozenBatchNorm2d(child.num_features)
            setattr(module, name, frozen)
        else:
            _freeze_timm_batch_norms(child)


TIMM_NAMES = {
    # MDETR's names -> current timm's names for the same weights' architecture
    "timm_tf_efficientnet_b3_ns": "tf_efficientnet_b3.ns_jft_in1k",
    "timm_tf_efficientnet_b5_ns": "tf_efficientnet_b5.ns_jft_in1k",
}


class ResNetBackbone(nn.Module):
    """torchvision ResNet with frozen batch norm; returns layer4 (and layer1-3 for masks)."""

    def __init__(self, name, return_interm_layers=False):
        super().__init__()
        resnet = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d)
        layers = ("layer1", "layer2", "layer3", "layer4") if return_interm_layers else ("layer4",)
        self.body = IntermediateLayerGetter(resnet, {n: str(i) for i, n in enumerate(layers)})
        self.num_channels = 512 if name in ("resnet18", "resnet34") else 2048
        self.interm_channels = [256, 512, 1024] if self.num_channels == 2048 else [64, 128, 256]

    def forward(self, x):
        return list(self.body(x).values())


class TimmBackbone(nn.Module):
    """timm EfficientNet (``features_only``, ``out_indices=(1, 2, 3, 4)``) with frozen batch norm."""

    def __init__(self, name, return_interm_layers=False):
        super().__init__()
        body = timm.create_model(TIMM_NAMES.get(name, name.removeprefix("timm_")), pretrained=False,
                                 features_only=True, out_indices=(1, 2, 3, 4))
        _freeze_timm_batch_norms(body)
        self.body = body
        channels = body.feature_info.channels()
        self.num_channels = channels[-1]
        self.interm_channels = channels[:-1]
        self.return_interm_layers = return_interm_layers

    def forward(self, x):
        features = self.body(x)
        return features if self.return_interm_layers else features[-1:]


def build_backbone(name, return_interm_layers=False):
    if name in SMALL_CNN_WIDTHS:
        return SmallCNN(SMALL_CNN_WIDTHS[name])
    if name.startswith("timm_"):
        return TimmBackbone(name, return_interm_layers)
    if name.startswith("resnet"):
        return ResNetBackbone(name, return_interm_layers)
    raise ValueError(f"unknown backbone {name!r}: expected resnet18/50/101 or timm_tf_efficientnet_b3_ns/b5_ns")


class PositionEmbeddingSine(nn.Module):
    """DETR's sine encoding of (y, x), normalized to [0, 2π] over each image's valid area."""

    def __init__(self, num_pos_feats=128, temperature=10000):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature

    def forward(self, mask):
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        eps, scale = 1e-6, 2 * math.pi
        y = y / (y[:, -1:, :] + eps) * scale
        x = x / (x[:, :, -1:] + eps) * scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x, pos_y = x[..., None] / dim_t, y[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class Joiner(nn.Sequential):
    """``backbone.0`` = CNN, ``backbone.1`` = position encoding, as the checkpoints name them.

    Returns every feature map with its padding mask (nearest-resized from the pixel mask) and
    the position encoding of the last map, the only one the transformer reads.
    """

    def __init__(self, backbone, position_embedding):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images, mask):
        features = self[0](images)
        masks = [F.interpolate(mask[None].float(), size=f.shape[-2:]).bool()[0] for f in features]
        return features, masks, self[1](masks[-1]).to(features[-1].dtype)


#: The toy backbones: one stride-2 stage per width, so "small_cnn" has stride 32 and
#: "small_cnn_s16" stride 16 (a 10 × 10 feature grid at 160 px, fine enough for small shapes).
SMALL_CNN_WIDTHS = {"small_cnn": (24, 48, 64, 96, 128), "small_cnn_s16": (32, 64, 96, 128)}


class SmallCNN(nn.Module):
    """The toy model's backbone: stride-2 conv-ReLU stages, one per width (~0.3 M parameters).

    Small enough to train on two CPU cores and ship inside the package, built only from
    modules every explainer already has a rule for.
    """

    def __init__(self, widths=(24, 48, 64, 96, 128)):
        super().__init__()
        layers, previous = [], 3
        for width in widths:
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
            previous = width
        self.body = nn.Sequential(*layers)
        self.num_channels = previous
        self.interm_channels = list(widths[1:4])

    def forward(self, x):
        return [self.body(x)]
