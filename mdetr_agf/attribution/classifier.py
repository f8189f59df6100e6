"""AGF for image classifiers: the authors' setting, and the conformance test of the engine."""
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError, InputTypeError
from .core.composites import torchvision_agf
from .core.rules import AGFOptions


class GaussianSoftmaxTarget:
    """The reference's scalar to explain: the softmax, at the target class, of the logits weighted
    by a Gaussian around the target logit (width: the largest distance to it). Summed over samples."""

    def __init__(self, class_ids):
        self.class_ids = class_ids  # LongTensor [N]

    def __call__(self, logits):
        t = self.class_ids.to(logits.device)[:, None]
        yt = logits.gather(1, t)
        sigma = (logits - yt).abs().max(dim=1, keepdim=True)[0]
        p = F.softmax(yt * torch.exp(-0.5 * ((logits - yt) / sigma) ** 2), dim=1)
        return p.gather(1, t).sum()


def explain_classifier(model, images, class_ids=None, *, no_fx=False, no_fdx=False, no_m=False,
                       no_reg=False, no_a=False, gradcam=False, composite=None) -> Tensor:
    """AGF maps [N, 1, H, W] for `images` [N, 3, H, W]: relevance at the input, each sample divided
    by its maximum over channels and pixels, then summed over channels (the reference's output).

    class_ids: None (arg-max class), an int for every sample, or one id per sample. The switches
    are the reference's ablations and configure the default composite (`torchvision_agf`); a custom
    `composite` carries its own options.
    """
    options = AGFOptions(no_fx=no_fx, no_fdx=no_fdx, no_m=no_m, no_reg=no_reg, no_a=no_a, gradcam=gradcam)
    if composite is None:
        composite = torchvision_agf(options)
    elif options != AGFOptions():
        raise InputError("ablation switches configure the default composite; "
                         "pass them as torchvision_agf(AGFOptions(...)) instead")
    if not isinstance(images, Tensor):
        raise InputTypeError(f"images must be a Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise InputError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")

    x = images.detach().requires_grad_(True)
    with torch.enable_grad(), composite.context(model) as tape:
        logits = model(x)
        target = GaussianSoftmaxTarget(_class_ids(class_ids, logits))
        tape.gradient(target(logits), x)
        (relevance,) = tape.relevance(logits, x, retain=False)  # one target: free the forward as it goes
    if relevance is None:
        raise InputError("no relevance reached the images: does the model use its input?")
    relevance = relevance / relevance.amax(dim=(1, 2, 3), keepdim=True)
    return relevance.sum(1, keepdim=True).detach()


def _class_ids(class_ids, logits):
    n, classes = logits.shape
    if class_ids is None:
        return logits.detach().argmax(1)
    ids = torch.as_tensor(class_ids, dtype=torch.long, device=logits.device).reshape(-1)
    if ids.numel() == 1:
        ids = ids.expand(n)
    if ids.numel() != n:
        raise InputError(f"class_ids: expected 1 or {n} ids, got {ids.numel()}")
    if ((ids < 0) | (ids >= classes)).any():
        raise InputError(f"class_ids must lie in [0, {classes}), got {ids.tolist()}")
    return ids
