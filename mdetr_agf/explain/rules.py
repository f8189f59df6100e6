"""AGF's propagation rules, one small object per module (see `engine.Rule`).

Each `relevance(record, R)` maps the relevance R at a module's output to its inputs. Local
gradients are never obtained by running a layer again: convolutions and linear layers use their
transposed map directly, the remaining modules reuse the graph recorded in the forward.
Epsilons, normalizations and combinations follow the authors' reference code (Gur, Ali, Wolf,
AAAI 2021), which is the conformance ground truth.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputTypeError
from .engine import Rule


@dataclass(frozen=True)
class AGFOptions:
    """The reference's ablations of the full rule; all False is AGF itself."""

    no_fx: bool = False  # drop the factorization of the activations, F_x
    no_fdx: bool = False  # drop the factorization of the gradients, F_∇x
    no_m: bool = False  # drop the gradient×activation term M
    no_reg: bool = False  # do not weigh F_x + M by sigmoid(C)
    no_a: bool = False  # drop the input-agnostic term A
    gradcam: bool = False  # Grad-CAM in place of F_x + M


# ---------------------------------------------------------------- helpers


def safe_divide(a, b):
    """a / b with the reference's stabilizer: b is shifted by 1e-9 and a zero b gives zero."""
    den = b + 1e-9
    den = den + (den == 0).to(den.dtype) * 1e-9
    return a / den * (b != 0).to(b.dtype)


def sample_max(t):
    """Per-sample maximum, shaped to broadcast against `t`."""
    return t.amax(dim=tuple(range(1, t.dim())), keepdim=True)


def sample_min(t):
    return t.amin(dim=tuple(range(1, t.dim())), keepdim=True)


def delta_shift(c, r):
    """Add r to c on c's support, minus r's mean there: redistributes without changing the total."""
    support = (c != 0).to(c.dtype)
    dims = tuple(range(1, c.dim()))
    return c + r - safe_divide(r.sum(dims, keepdim=True), support.sum(dims, keepdim=True)) * support


def _forward(module, x, weight):
    """The layer's linear map (no bias) with another weight."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    raise InputTypeError(f"expected Conv2d or Linear, got {type(module).__name__}")


def _transpose(module, grad, weight, shape):
    """The transposed map: gradient at the input for `grad` at the output (batch may differ)."""
    if isinstance(module, nn.Conv2d):
        shape = (grad.shape[0], *shape[1:])
        return torch.nn.grad.conv2d_input(shape, weight, grad, module.stride, module.padding,
                                          module.dilation, module.groups)
    return grad @ weight


def _vjp(record, grad):
    """Vector-Jacobian product through the module's recorded graph (no recomputation)."""
    wanted = [t for t in record.inputs if t.requires_grad]
    grads = iter(torch.autograd.grad(record.output, wanted, grad, retain_graph=True, allow_unused=True))
    return [next(grads) if t.requires_grad else None for t in record.inputs]


def _abs_share(module, x, relevance):
    """C: relevance shared by the absolute contributions |x||w| (the reference's 'flat' rule)."""
    xa, wa = x.abs(), module.weight.abs()
    return xa * _transpose(module, safe_divide(relevance, _forward(module, xa, wa)), wa, x.shape)


# ---------------------------------------------------------------- rules


class Pass(Rule):
    """Relevance passes unchanged: the reference treats batch norm and dropout as identities."""

    def relevance(self, record, relevance):
        return (relevance,) + (None,) * (len(record.inputs) - 1)


class ZRule(Rule):
    """LRP-0, R_i = x_i ∂z/∂x_i · R/z: exact sharing for piecewise-linear ops (ReLU, pooling, sums)."""

    def relevance(self, record, relevance):
        grads = _vjp(record, safe_divide(relevance, record.output.detach()))
        return tuple(None if g is None else x.detach() * g for x, g in zip(record.inputs, grads))


class GradientTimesInput(Rule):
    """x ⊙ ∇x of the target: how AGF starts at the classifier's last layer, ignoring R."""

    def relevance(self, record, relevance):
        grads = _vjp(record, record.gradient())
        return tuple(None if g is None else x.detach() * g for x, g in zip(record.inputs, grads))


class Flat(Rule):
    """C alone, |x||w| sharing: the reference's rule for 1x1/shortcut convolutions and hidden Linears."""

    def relevance(self, record, relevance):
        return (_abs_share(self.module, record.x, relevance),)


class FlatShift(Rule):
    """C plus the delta-shifted M of the pooled map: the reference's first Linear after pooling.

    `channels` is the channel count of the flattened map, so M = relu(mean over channels of x·∇x)
    is taken per spatial position as in the convolutional layers.
    """

    def __init__(self, channels):
        self.channels = channels

    def relevance(self, record, relevance):
        x = record.x
        c = _abs_share(self.module, x, relevance)
        g = _transpose(self.module, record.gradient(), self.module.weight, x.shape)
        m = (x * g).reshape(x.shape[0], self.channels, -1).mean(1, keepdim=True)
        m = F.relu(m).expand(-1, self.channels, -1).reshape(x.shape) * (c != 0)
        return (delta_shift(c, safe_divide(m, sample_max(m))),)


class ZBox(Rule):
    """z^B for the first layer: inputs bounded by their per-sample min and max, so pixel values of
    either sign attribute properly."""

    def relevance(self, record, relevance):
        module, x = self.module, record.x
        w = module.weight
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        low, high = sample_min(x), sample_max(x)
        ones = torch.ones_like(x[:1])
        z = _forward(module, x, w) - low * _forward(module, ones, wp) - high * _forward(module, ones, wn)
        s = safe_divide(relevance, z)
        # x·Wᵀs − l·W⁺ᵀs − h·W⁻ᵀs, with Wᵀ = W⁺ᵀ + W⁻ᵀ
        tp, tn = _transpose(module, s, wp, x.shape), _transpose(module, s, wn, x.shape)
        return ((x - low) * tp + (x - high) * tn,)


class AGF(Rule):
    """The full AGF rule: C, delta-shifted by the factorized, gradient-guided residual R (paper, eq. 9-13)."""

    def __init__(self, options=AGFOptions()):
        self.options = options

    def relevance(self, record, relevance):
        opt, module, x = self.options, self.module, record.x
        w, wa = module.weight, module.weight.abs()
        support = (relevance != 0).to(x.dtype)
        g = record.gradient()
        # true input gradient, and the one restricted to outputs that carry relevance
        g_in, g_rel = _transpose(module, torch.cat([g, g * support]), w, x.shape).chunk(2)

        c = _abs_share(module, x, relevance)
        numer = torch.zeros_like(x[:, :1])
        if opt.gradcam:
            numer = F.relu((x * g_rel.mean((2, 3), keepdim=True)).mean(1, keepdim=True))
        else:
            if not opt.no_fx:
                numer = numer + F.relu(_factorize(safe_divide(x, sample_max(x)), c))
            if not opt.no_m:
                m = F.relu((x * g_in).mean(1, keepdim=True))
                numer = numer + safe_divide(m, sample_max(m))
        r = numer if opt.no_reg else safe_divide(numer, 1 + torch.exp(-c))
        if not opt.no_fdx:
            r = r + F.relu(_factorize(safe_divide(g_rel, sample_max(g_rel)), c))
        if not opt.no_a:
            ones = torch.ones_like(x[:1])
            r = r + _transpose(module, safe_divide(relevance, _forward(module, ones, wa)), wa, x.shape)
        return (delta_shift(c, r * (c != 0)),)


def _factorize(t, c):
    """Factorize t against the sign of the channel-mean of C: a two-component non-negative
    regression per pixel; returns (positive - negative) weight, shaped [N, 1, H, W]."""
    n, ch, h, w = t.shape
    phi = c.mean(1).flatten(1)  # [N, HW]
    parts = torch.stack([phi < 0, phi > 0], dim=2).to(t.dtype)  # [N, HW, 2]: negative, positive
    heaviside = torch.sigmoid(10 * t).reshape(n, ch, h * w)  # [N, C, HW]
    reps = safe_divide(heaviside @ parts, parts.sum(1, keepdim=True))  # [N, C, 2] mean per part
    gram = reps.transpose(1, 2) @ reps + torch.eye(2, dtype=t.dtype, device=t.device)
    weights = F.relu(torch.linalg.solve(gram, reps.transpose(1, 2) @ heaviside))  # [N, 2, HW]
    return (weights[:, 1] - weights[:, 0]).reshape(n, 1, h, w)
