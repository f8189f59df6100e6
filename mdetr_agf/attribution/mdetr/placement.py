"""AGF through the whole of MDETR: which rule goes on which module (docs/agf_rules.md).

From the target's head, relevance runs back through the decoder, the joint image+text encoder,
`input_proj` and the whole CNN backbone to the pixels, and through the resizer and every
text-encoder layer to the word embeddings. `agf_composite(model, heads)` builds the composite:

- the target's head Linear(s)/conv: `Start` (x ⊙ ∇x of the target score, as the reference's start);
- convolutions: the stem (the pixel layer) `ZBox`; torchvision ResNet blocks the reference's
  placement (`reference_placement`); elsewhere pointwise (1×1) convolutions `Flat` (EfficientNet's
  conv_pw/conv_pwl/SE, the mask head's adapters) and spatial ones the full `AGF` (EfficientNet's
  depthwise conv_dw, the mask head's lay1..lay5, the toy CNN); `input_proj`, where the transformer
  reads the backbone's map, `AttributionShift` (a signed map for the AGF rules below it);
- every other Linear and `ops.Project`: `Flat`; attention's A·V: `AttentionMix`; Q·Kᵀ and the
  box-attention map: `Bilinear(0.5)`; the transformers' sums (`ops.Add`: residual, embedding and
  position sums) `AbsoluteSum`; the CNNs' residual sums, ReLU, max-pool: `ZRule`;
- norms, dropout, softmax, smooth activations, squeeze-excite (gate held constant): `Pass`;
- embeddings and the sine position encoding: `Terminal`.

Every module gets a rule or is a listed container (`CONTAINERS`: modules whose forward only
composes children with tensor operations that autograd carries exactly — reshape, cat, slicing,
repeat, nearest interpolation, masking); anything else makes `rules()` raise instead of falling
back silently to the gradient. Users swap rules with `name_rules` (qualified name → factory) and
`type_rules` ([(types, factory)]), which win over the placement below in that order.
"""
import contextlib
import functools
import types

from torch import nn

from ...errors import InputError, InputTypeError
from ...models import attention, backbone, mdetr, segmentation, text_encoder, transformer
from ...models.mdetr import core, module_prefix
from ...ops import Add, MatMul, Project
from ..core.composites import Composite, reference_placement, no_inplace, resnet_residual_add
from .rules import (AbsoluteSum, AttentionMix, AttributionShift, Bilinear, ProjectFlat, SamePadding, Start,
                          Terminal, ZBoxSame, is_same_padded)
from ..core.rules import AGF, AGFOptions, Flat, Pass, ZBox, ZRule


def _timm_types(*names):
    """timm classes by dotted path, skipping those this timm version lacks."""
    import importlib

    found = []
    for path in names:
        module, _, cls = path.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), cls))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


@functools.lru_cache(maxsize=1)
def _timm():
    return types.SimpleNamespace(
        squeeze_excite=_timm_types("timm.models._efficientnet_blocks.SqueezeExcite",
                                   "timm.layers.squeeze_excite.SEModule"),
        drop_path=_timm_types("timm.layers.DropPath"),
        blocks=_timm_types("timm.models._efficientnet_blocks.DepthwiseSeparableConv",
                           "timm.models._efficientnet_blocks.InvertedResidual"),
        features=_timm_types("timm.models.efficientnet.EfficientNetFeatures"),
    )


def containers():
    """Module types that get no rule: their forward composes children and exact tensor ops."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return (
        mdetr.MDETR, mdetr.MDETRSegmentation, mdetr.MLP,
        transformer.Transformer, transformer.Encoder, transformer.Decoder, transformer.EncoderLayer,
        transformer.DecoderLayer, transformer.FeatureResizer,
        attention.MultiheadAttention,  # its packed weights enter through its Project modules
        text_encoder.TextEncoder, text_encoder.Embeddings, text_encoder.LayerStack, text_encoder.Layer,
        text_encoder.Attention, text_encoder.SelfAttention, text_encoder.DenseAddNorm,
        text_encoder.Intermediate, text_encoder.Pooler,
        segmentation.MHAttentionMap, segmentation.MaskHeadSmallConv,
        backbone.Joiner, backbone.ResNetBackbone, backbone.TimmBackbone, backbone.SmallCNN,
        IntermediateLayerGetter, BasicBlock, Bottleneck,  # residual sums: `resnet_residual_add`
        *_timm().blocks, *_timm().features,  # residual sums: `timm_residual_add`
        nn.Sequential, nn.ModuleList, nn.ModuleDict,
    )


def default_type_map(options=AGFOptions()):
    """The rules that depend on a module's type alone (first match wins)."""
    return [
        ((Add, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d), ZRule),
        ((nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, backbone.FrozenBatchNorm2d, nn.Dropout, nn.Identity,
          nn.Softmax, *_timm().drop_path, *_timm().squeeze_excite), Pass),
        ((nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid), Pass),
        ((nn.Embedding, backbone.PositionEmbeddingSine), Terminal),
        (Project, ProjectFlat),
        (MatMul, Bilinear),  # A·V is placed by name (`AttentionMix`)
        (nn.Linear, Flat),
        (nn.Conv2d, lambda: AGF(options)),  # by geometry and position in `mdetr_placement`
    ]


def _prefix_of(model, module):
    return next(name for name, m in model.named_modules() if m is module)


def resolve_heads(model, heads):
    """Qualified names of the head modules; a name missing the PhraseCut wrapper's ``detr.``
    prefix is completed. Unknown names raise."""
    modules, prefix = dict(model.named_modules()), module_prefix(model)
    resolved = []
    for name in heads:
        if name not in modules and prefix and prefix + name in modules:
            name = prefix + name
        if name not in modules or name == "":
            raise InputError(f"unknown head module {name!r}: the target must name modules of the model")
        resolved.append(name)
    if not resolved:
        raise InputError("no head named: AGF needs the module(s) where the target's relevance starts")
    return resolved


def mdetr_placement(model, heads, options=AGFOptions()):
    """{qualified name: factory} for the rules that depend on position, not type alone."""
    names, full = {}, lambda: AGF(options)
    detr = core(model)
    cnn = detr.backbone[0]
    cnn_prefix = _prefix_of(model, cnn)
    is_resnet = any(type(m).__name__ in ("Bottleneck", "BasicBlock") for m in cnn.modules())

    transformer_prefix = _prefix_of(model, detr.transformer) + "."
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):  # by geometry: pointwise convolutions mix no space
            names[name] = Flat if m.kernel_size == (1, 1) else full
        elif isinstance(m, MatMul) and name.rsplit(".", 1)[-1] == "context":
            names[name] = AttentionMix
        elif isinstance(m, Add) and name.startswith(transformer_prefix):
            names[name] = AbsoluteSum
    names[_prefix_of(model, detr.input_proj)] = AttributionShift
    if is_resnet:  # the reference's placement inside residual blocks
        body = cnn.body
        body_prefix = _prefix_of(model, body)
        for name, factory in reference_placement(body).items():
            if isinstance(body.get_submodule(name), nn.Conv2d):
                names[f"{body_prefix}.{name}"] = factory
    stem = next((n for n, m in cnn.named_modules() if isinstance(m, nn.Conv2d)), None)
    if stem is not None:
        names[f"{cnn_prefix}.{stem}"] = ZBoxSame if is_same_padded(cnn.get_submodule(stem)) else ZBox
    for name in heads:
        names[name] = Start
    return names


class MDETRComposite(Composite):
    """A `Composite` that (1) runs every convolution rule on timm's 'same'-padded convolutions
    through `SamePadding`, and (2) refuses a model with a module that has neither a rule nor a
    container type, so nothing falls back silently to the plain gradient."""

    def __init__(self, *args, containers=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.containers = tuple(containers)

    def rules(self, model):
        found = super().rules(model)
        for name, (module, rule) in found.items():
            if is_same_padded(module) and not getattr(rule, "same_padding", False):
                found[name] = (module, SamePadding(rule))
        missing = [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
                   if name not in found and not isinstance(m, self.containers)]
        if missing:
            raise InputTypeError(f"no AGF rule for {len(missing)} module(s): {', '.join(missing[:8])}"
                                 f"{' …' if len(missing) > 8 else ''}; give them one with name_rules/type_rules")
        return found

    def table(self, model):
        """{qualified name: rule description} as it would be placed (for docs and tests)."""
        with contextlib.ExitStack() as stack:
            for canonizer in self.canonizers:
                stack.enter_context(canonizer(model))
            return {name: repr(rule) for name, (_, rule) in self.rules(model).items()}


def agf_composite(model, heads, options=AGFOptions(), *, name_rules=None, type_rules=()):
    """The AGF composite for `model` (an MDETR or its PhraseCut wrapper), starting at `heads`
    (qualified module names, from `target.heads(model)`).

    name_rules: {qualified name: factory} and type_rules: [(types, factory)] replace the default
    placement (name_rules first); factories are called with no arguments, once per module."""
    heads = resolve_heads(model, heads)
    user_types = list(type_rules)
    user_names = dict(name_rules or {})

    def placement(m):
        names = mdetr_placement(m, heads, options)
        if user_types:  # a user's type rule beats the positional defaults for its types
            names = {n: f for n, f in names.items()
                     if not any(isinstance(m.get_submodule(n), t) for t, _ in user_types)}
        names.update(user_names)
        return names

    return MDETRComposite(
        type_map=user_types + default_type_map(options),
        name_map=placement,
        canonizers=[no_inplace, resnet_residual_add, timm_residual_add],
        containers=containers(),
    )


# ---------------------------------------------------------------- canonizer: timm residual sums


@contextlib.contextmanager
def timm_residual_add(model):
    """timm's EfficientNet blocks sum the skip with a bare `self.drop_path(x) + shortcut`; route it
    through an `Add` module (`residual_add`, no parameters) so the z-rule can split it. Restored on
    exit. A block type with a skip that this canonizer does not know raises."""
    forwards = _timm_forwards()
    blocks = []
    for name, m in model.named_modules():
        if getattr(m, "has_skip", False) and type(m).__module__.startswith("timm."):
            if type(m) not in forwards:
                raise InputTypeError(f"{name}: no canonizer for timm's {type(m).__name__} residual sum")
            blocks.append(m)
    try:
        for block in blocks:
            block.add_module("residual_add", Add())
            block.forward = types.MethodType(forwards[type(block)], block)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
            block._modules.pop("residual_add", None)


def _timm_forwards():
    try:
        from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    except ImportError:  # pragma: no cover
        return {}
    return {DepthwiseSeparableConv: _depthwise_separable_forward, InvertedResidual: _inverted_residual_forward}


def _space_to_depth(self, x):
    if getattr(self, "conv_s2d", None) is not None:
        x = self.bn_s2d(self.conv_s2d(x))
    return x


def _depthwise_separable_forward(self, x):
    """timm 1.0's DepthwiseSeparableConv.forward with the skip sum made a module."""
    shortcut = x
    x = _space_to_depth(self, x)
    x = self.bn2(self.conv_pw(self.se(self.aa(self.bn1(self.conv_dw(x))))))
    return self.residual_add(self.drop_path(x), shortcut) if self.has_skip else x


def _inverted_residual_forward(self, x):
    """timm 1.0's InvertedResidual.forward with the skip sum made a module."""
    shortcut = x
    x = _space_to_depth(self, x)
    x = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
    x = self.bn3(self.conv_pwl(self.se(self.aa(x))))
    return self.residual_add(self.drop_path(x), shortcut) if self.has_skip else x


__all__ = ["MDETRComposite", "containers", "default_type_map", "agf_composite", "mdetr_placement", "resolve_heads",
           "timm_residual_add"]
