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

from ...errors import InputTypeError
from ...ops import Add
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
    den.masked_fill_(den == 0, 1e-9)
    return (a / den).masked_fill_(b == 0, 0.0)


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


def shift_by_map(c, spatial):
    """C plus the non-negative map `spatial` (shaped like C), max-normalized and delta-shifted on
    C's support, so C's total is kept: the step `FlatShift` and `AttributionShift` share."""
    spatial = spatial * (c != 0)
    return delta_shift(c, safe_divide(spatial, sample_max(spatial)))


def _forward(module, x, weight):
    """The layer's linear map (no bias) with another weight."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise InputTypeError(f"AGF rules support zero-padded convolutions with numeric padding, got {module}")
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


def _forward_ones(module, x, weight):
    """The layer's map (no bias) applied to an all-ones input like x, for one sample."""
    if isinstance(module, nn.Conv2d) and module.groups == 1:  # all channels equal: sum them first
        return _forward(module, torch.ones_like(x[:1, :1]), weight.sum(1, keepdim=True))
    return _forward(module, torch.ones_like(x[:1]), weight)


def _vjp(record, grad):
    """Vector-Jacobian product through the module's recorded graph (no recomputation)."""
    wanted = [t for t, c in zip(record.inputs, record.carries) if c]
    grads = iter(torch.autograd.grad(record.output, wanted, grad, retain_graph=True, allow_unused=True))
    return [next(grads) if c else None for c in record.carries]


def _abs_forward(record, module):
    """|x| and the layer applied to |x| with |W|: from the forward alone. The layer's output is the
    costly part, so only it is cached (while several targets share the forward); |x| is one
    element-wise operation, cheaper to redo than to hold."""
    xa = record.x.abs()
    return xa, record.cached("abs_forward", lambda: _forward(module, xa, module.weight.abs()))


def abs_share(record, module, relevance):
    """C: relevance shared by the absolute contributions |x||w| (the reference's 'flat' rule)."""
    xa, z = _abs_forward(record, module)
    return xa * _transpose(module, safe_divide(relevance, z), module.weight.abs(), xa.shape)


# ---------------------------------------------------------------- rules


class Pass(Rule):
    """Relevance passes unchanged: the reference treats batch norm and dropout as identities."""

    reads = ()

    def fences(self, n_inputs):
        return False

    def relevance(self, record, relevance):
        return (relevance,) + (None,) * (len(record.inputs) - 1)


class ZRule(Rule):
    """LRP-0, R_i = x_i ∂z/∂x_i · R/z: exact sharing for piecewise-linear ops (ReLU, pooling, sums).

    ReLU and sums have their local gradient written out (the same operations autograd's backward
    of each would run, so the same numbers); other modules differentiate their recorded graph.
    A ReLU keeps only its output (which equals its input wherever the local gradient is not zero);
    a sum keeps its operands and adds them again (the same addition: the same numbers)."""

    @property
    def reads(self):
        if isinstance(self.module, nn.ReLU):
            return ("output",)
        return ("inputs",) if isinstance(self.module, Add) else ("inputs", "output")

    def fences(self, n_inputs):
        return n_inputs > 1 and not isinstance(self.module, Add)

    def relevance(self, record, relevance):
        if isinstance(self.module, nn.ReLU):
            out = record.output.detach()
            return (out * safe_divide(relevance, out).masked_fill_(out <= 0, 0.0),)
        inputs = [None if x is None else x.detach() for x in record.inputs]
        if isinstance(self.module, Add):
            s = safe_divide(relevance, self.module(*inputs))
            grads = [s.sum_to_size(x.shape) if c else None for x, c in zip(inputs, record.carries)]
        else:
            grads = _vjp(record, safe_divide(relevance, record.output.detach()))
        return tuple(None if g is None else x * g for x, g in zip(inputs, grads))


class GradientTimesInput(Rule):
    """x ⊙ ∇x of the target: how AGF starts at the classifier's last layer, ignoring R."""

    starts_relevance = True
    reads = ("inputs", "input_gradient")

    def relevance(self, record, relevance):
        return tuple(x.detach() * record.input_gradient(i) if c else None
                     for i, (x, c) in enumerate(zip(record.inputs, record.carries)))


class Flat(Rule):
    """C alone, |x||w| sharing: the reference's rule for 1x1/shortcut convolutions and hidden Linears."""

    def fences(self, n_inputs):
        return False

    def relevance(self, record, relevance):
        return (abs_share(record, self.module, relevance),)


class FlatShift(Rule):
    """C plus the delta-shifted M of the pooled map: the reference's first Linear after pooling.

    `channels` is the channel count of the flattened map, so M = relu(mean over channels of x·∇x)
    is taken per spatial position as in the convolutional layers.
    """

    reads = ("inputs", "input_gradient")

    def __init__(self, channels):
        self.channels = channels

    def relevance(self, record, relevance):
        x = record.x
        c = abs_share(record, self.module, relevance)
        m = (x * record.input_gradient()).reshape(x.shape[0], self.channels, -1).mean(1, keepdim=True)
        return (shift_by_map(c, F.relu(m).expand(-1, self.channels, -1).reshape(x.shape)),)


class ZBox(Rule):
    """z^B for the first layer: inputs bounded by their per-sample min and max, so pixel values of
    either sign attribute properly."""

    def fences(self, n_inputs):
        return False

    def relevance(self, record, relevance):
        module, x = self.module, record.x
        w = module.weight
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        low, high = sample_min(x), sample_max(x)
        z = _forward(module, x, w) - low * _forward_ones(module, x, wp) - high * _forward_ones(module, x, wn)
        s = safe_divide(relevance, z)
        # x·Wᵀs − l·W⁺ᵀs − h·W⁻ᵀs, with Wᵀ = W⁺ᵀ + W⁻ᵀ
        tp, tn = _transpose(module, s, wp, x.shape), _transpose(module, s, wn, x.shape)
        return ((x - low) * tp + (x - high) * tn,)


class AGF(Rule):
    """The full AGF rule for convolutions: C, delta-shifted by the residual built from F_x and
    F_∇x, the gradient×activation term M and the input-agnostic term A (weighted as the reference)."""

    reads = ("inputs", "gradient", "input_gradient")

    def __init__(self, options=AGFOptions()):
        self.options = options

    def relevance(self, record, relevance):
        opt, module, x = self.options, self.module, record.x
        w, wa = module.weight, module.weight.abs()
        # the input gradient restricted to outputs that carry relevance (usually all that have a gradient)
        g, g_rel = record.gradient(), record.input_gradient()
        if ((g != 0) & (relevance == 0)).any():
            g_rel = _transpose(module, g * (relevance != 0), w, x.shape)

        # C (|x||w| sharing) and A (|w| sharing, as if every input were 1): one transposed map for both
        xa, z = _abs_forward(record, module)
        shares = [safe_divide(relevance, z)]
        if not opt.no_a:
            shares.append(safe_divide(relevance, _forward_ones(module, x, wa)))  # one channel: cheap
        t = _transpose(module, torch.cat(shares), wa, x.shape).chunk(len(shares))
        c = xa * t[0]

        numer = torch.zeros_like(x[:, :1])
        if opt.gradcam:
            numer = F.relu((x * g_rel.mean((2, 3), keepdim=True)).mean(1, keepdim=True))
        else:
            if not opt.no_fx:
                numer = numer + F.relu(_factorize(safe_divide(x, sample_max(x)), c))
            if not opt.no_m:
                m = F.relu((x * record.input_gradient()).mean(1, keepdim=True))
                numer = numer + safe_divide(m, sample_max(m))
        r = numer if opt.no_reg else safe_divide(numer, 1 + torch.exp(-c))
        if not opt.no_fdx:
            r = r + F.relu(_factorize(safe_divide(g_rel, sample_max(g_rel)), c))
        if not opt.no_a:
            r = r + t[1]
        return (delta_shift(c, r * (c != 0)),)


def _factorize(t, c):
    """Factorize t against the sign of the channel-mean of C: a two-component non-negative
    regression per pixel; returns (positive - negative) weight, shaped [N, 1, H, W]."""
    n, ch, h, w = t.shape
    phi = c.mean(1).flatten(1)  # [N, HW]
    parts = torch.stack([phi < 0, phi > 0], dim=2).to(t.dtype)  # [N, HW, 2]: negative, positive
    heaviside = torch.sigmoid(10 * t).reshape(n, ch, h * w)  # [N, C, HW]
    reps = safe_divide(heaviside @ parts, parts.sum(1, keepdim=True))  # [N, C, 2] mean per part
    # weights = (RᵀR + I)⁻¹ Rᵀ H, the 2x2 inverse in closed form
    gram = reps.transpose(1, 2) @ reps  # [N, 2, 2]
    a, b, d = gram[:, 0, :1] + 1, gram[:, 0, 1:], gram[:, 1, 1:] + 1  # [N, 1] each
    u_neg, u_pos = (reps.transpose(1, 2) @ heaviside).unbind(1)  # [N, HW] each
    det = a * d - b * b
    w_neg, w_pos = F.relu((d * u_neg - b * u_pos) / det), F.relu((a * u_pos - b * u_neg) / det)
    return (w_pos - w_neg).reshape(n, 1, h, w)
