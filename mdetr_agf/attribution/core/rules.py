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
    """a / b with the reference's stabilizer: b is shifted by 1e-9 and a zero b gives zero.

    Written with arithmetic (a multiplication by ``support(b)``) rather than boolean masks, which
    cost several times an arithmetic pass on CPU; the rare elements the arithmetic cannot settle
    (a shifted b of exactly zero, an infinite quotient) send the call to the masked form. A small
    (per-sample) b is checked for a zero shifted b directly; with none, the masked form divides by
    the same shifted b, so it could not mend an overflow either."""
    den = b + 1e-9
    if b.numel() * 64 <= a.numel():  # a per-sample divisor: its checks are cheap, the quotient one pass
        if not bool((den == 0).any()):
            out = a / den
            return out.mul_(support(b)) if not bool((b != 0).all()) else out
    else:
        out = torch.div(a, den, out=den) if a.shape == b.shape and a.dtype == b.dtype and _untracked(a, b) else a / den
        if torch.count_nonzero(b) < b.numel():
            out.mul_(support(b))
        if torch.isfinite(out.sum()):
            return out
    den = b + 1e-9  # afresh: the full-size branch may have divided into it
    den.masked_fill_(den == 0, 1e-9)
    return (a / den).masked_fill_(b == 0, 0.0)


def _untracked(*tensors):
    """Whether autograd records none of ``tensors`` (``out=`` and in-place writes are then free to
    reuse buffers; in the relevance stream it never does, called from a test it may)."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def support(t):
    """1 where t is non-zero, 0 where it is zero, as t's dtype (cheaper than ``(t != 0).to(dtype)``)."""
    return t.sign().abs_()


def sample_max(t):
    """Per-sample maximum, shaped to broadcast against `t`."""
    return t.amax(dim=tuple(range(1, t.dim())), keepdim=True)


def sample_min(t):
    return t.amin(dim=tuple(range(1, t.dim())), keepdim=True)


def delta_shift(c, r, on=None, into=False):
    """Add r to c on c's support (``on``: ``support(c)``, when the caller has it), minus r's mean
    there: redistributes without changing the total. ``into``: write the result into r's and
    on's buffers (both the caller's own, shaped like c): the same numbers, two buffers fewer."""
    on = support(c) if on is None else on
    dims = tuple(range(1, c.dim()))
    shift = safe_divide(r.sum(dims, keepdim=True), on.sum(dims, keepdim=True))
    return r.add_(c).sub_(on.mul_(shift)) if into else c + r - shift * on


def shift_by_map(c, spatial):
    """C plus the non-negative map `spatial` (shaped like C), max-normalized and delta-shifted on
    C's support, so C's total is kept: the step `FlatShift` and `AttributionShift` share."""
    on = support(c)
    spatial = spatial * on
    return delta_shift(c, safe_divide(spatial, sample_max(spatial)), on)


def _check_conv(module):
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise InputTypeError(f"AGF rules support zero-padded convolutions with numeric padding, got {module}")


def _forward(module, x, weight):
    """The layer's linear map (no bias) with another weight."""
    if isinstance(module, nn.Conv2d):
        _check_conv(module)
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    raise InputTypeError(f"expected Conv2d or Linear, got {type(module).__name__}")


def _transpose(module, grad, weight, like):
    """The transposed map: gradient at the input for `grad` at the output; `like` is a tensor shaped
    as that input (the recorded one), given to the kernel as it is in a backward."""
    if isinstance(module, nn.Conv2d):
        return conv_input_gradient(grad, like, weight, module.stride, module.padding, module.dilation,
                                   module.groups)
    return grad @ weight


def conv_input_gradient(grad, like, weight, stride, padding, dilation, groups):
    """The gradient at a convolution's input for `grad` at its output: the kernel autograd's backward
    runs, handed a real tensor shaped as the input (``torch.nn.grad.conv2d_input`` hands it a
    broadcast placeholder, which costs a copy of the input's size and, for depthwise convolutions,
    a slower kernel); the same numbers."""
    stride, padding, dilation = (tuple(v) if isinstance(v, (tuple, list)) else (v, v)
                                 for v in (stride, padding, dilation))
    return torch.ops.aten.convolution_backward(grad, like, weight, None, stride, padding, dilation, False, (0, 0),
                                               groups, (True, False, False))[0]


def _forward_ones(module, x, weight):
    """The layer's map (no bias) applied to an all-ones input like x, for one sample."""
    if isinstance(module, nn.Conv2d) and module.groups == 1:  # all channels equal: sum them first
        return _forward(module, torch.ones_like(x[:1, :1]), weight.sum(1, keepdim=True))
    if isinstance(module, nn.Conv2d) and weight.shape[1] == 1:  # depthwise: one all-ones channel serves every filter
        _check_conv(module)
        return F.conv2d(torch.ones_like(x[:1, :1]), weight, None, module.stride, module.padding, module.dilation)
    return _forward(module, torch.ones_like(x[:1]), weight)


def _vjp(record, grad):
    """Vector-Jacobian product through the module's recorded graph (no recomputation)."""
    wanted = [t for t, c in zip(record.inputs, record.carries) if c]
    grads = iter(torch.autograd.grad(record.output, wanted, grad, retain_graph=True, allow_unused=True))
    return [next(grads) if c else None for c in record.carries]


def _abs_forward(record, module, wa):
    """|x| and the layer applied to |x| with |W| (``wa``): from the forward alone. The layer's output
    is the costly part, so only it is cached (while several targets share the forward); |x| is one
    element-wise operation, cheaper to redo than to hold."""
    xa = record.x.abs()
    return xa, record.cached("abs_forward", lambda: _forward(module, xa, wa))


def abs_share(record, module, relevance):
    """C: relevance shared by the absolute contributions |x||w| (the reference's 'flat' rule)."""
    wa = module.weight.detach().abs()
    xa, z = _abs_forward(record, module, wa)
    return xa * _transpose(module, safe_divide(relevance, z), wa, xa)


# ---------------------------------------------------------------- rules


class Pass(Rule):
    """Relevance passes unchanged: the reference treats batch norm and dropout as identities."""

    reads = ()
    skips_zero = False  # passing zeros on costs nothing; checking for them costs a pass

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
            # out >= 0: where it is 0 the product is 0 without safe_divide's mask (the same numbers)
            r = relevance / (out + 1e-9)
            r.mul_(out)
            if torch.isfinite(r.sum()):
                return (r,)
            return (out * safe_divide(relevance, out),)
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
        tp, tn = _transpose(module, s, wp, x), _transpose(module, s, wn, x)
        return ((x - low) * tp + (x - high) * tn,)


class AGF(Rule):
    """The full AGF rule for convolutions: C, delta-shifted by the residual built from F_x and
    F_∇x, the gradient×activation term M and the input-agnostic term A (weighted as the reference)."""

    reads = ("inputs", "gradient", "input_gradient")

    def __init__(self, options=AGFOptions()):
        self.options = options

    def relevance(self, record, relevance):
        opt, module, x = self.options, self.module, record.x
        w = module.weight.detach()
        wa = w.abs()
        # the input gradient restricted to outputs that carry relevance (usually all that have a gradient)
        g, g_rel = record.gradient(), record.input_gradient()
        if torch.count_nonzero(relevance) < relevance.numel():
            g_on = g * support(relevance)
            if torch.count_nonzero(g_on) != torch.count_nonzero(g):  # g non-zero where no relevance arrives
                g_rel = _transpose(module, g_on, w, x)

        # C (|x||w| sharing) and A (|w| sharing, as if every input were 1): one transposed map each
        xa, z = _abs_forward(record, module, wa)
        shares = [safe_divide(relevance, z)]
        if not opt.no_a:
            shares.append(safe_divide(relevance, _forward_ones(module, x, wa)))  # one channel: cheap
        t = [_transpose(module, share, wa, x) for share in shares]
        # Below, every full-size tensor is this call's own: steps that only rescale or add to one run
        # in place (the same operations in the same order, so the same numbers, with fewer buffers).
        c = t[0].mul_(xa)
        del xa
        on, parts = support(c), _sign_parts(c)

        numer = torch.zeros_like(x[:, :1])
        if opt.gradcam:
            numer = F.relu((x * g_rel.mean((2, 3), keepdim=True)).mean(1, keepdim=True))
        else:
            if not opt.no_fx:
                numer = numer + F.relu(_factorize(safe_divide(x, sample_max(x)), parts))
            if not opt.no_m:
                m = F.relu((x * record.input_gradient()).mean(1, keepdim=True))
                numer = numer + safe_divide(m, sample_max(m))
        if opt.no_reg:
            r = numer
        else:  # numer / (1 + exp(-C)): the denominator is >= 1, so safe_divide's zero guard never acts
            den = torch.neg(c).exp_().add_(1).add_(1e-9)
            r = torch.div(numer, den, out=den) if _untracked(numer, den) else numer / den
        if not opt.no_fdx:
            r = _plus(r, F.relu(_factorize(safe_divide(g_rel, sample_max(g_rel)), parts)))
        if not opt.no_a:
            r = _plus(r, t[1])
        r = r.mul_(on) if r.shape == on.shape else r * on
        return (delta_shift(c, r, on, into=True),)


def _plus(r, t):
    """r + t, into r when r already has the sum's shape (r is the caller's own buffer)."""
    return r.add_(t) if r.shape == torch.broadcast_shapes(r.shape, t.shape) else r + t


def _sign_parts(c):
    """[N, HW, 2]: whether the channel-mean of C is negative / positive at each pixel."""
    phi = c.mean(1).flatten(1)  # [N, HW]
    return torch.stack([phi < 0, phi > 0], dim=2).to(c.dtype)


def _factorize(t, parts):
    """Factorize t against the sign of the channel-mean of C (``parts``: ``_sign_parts(C)``): a
    two-component non-negative regression per pixel; returns (positive - negative) weight, shaped
    [N, 1, H, W]. ``t`` is the caller's own buffer and is used up."""
    n, ch, h, w = t.shape
    heaviside = t.mul_(10).sigmoid_().reshape(n, ch, h * w)  # [N, C, HW]
    reps = safe_divide(heaviside @ parts, parts.sum(1, keepdim=True))  # [N, C, 2] mean per part
    # weights = (RᵀR + I)⁻¹ Rᵀ H, the 2x2 inverse in closed form
    gram = reps.transpose(1, 2) @ reps  # [N, 2, 2]
    a, b, d = gram[:, 0, :1] + 1, gram[:, 0, 1:], gram[:, 1, 1:] + 1  # [N, 1] each
    u_neg, u_pos = (reps.transpose(1, 2) @ heaviside).unbind(1)  # [N, HW] each
    det = a * d - b * b
    w_neg, w_pos = F.relu((d * u_neg - b * u_pos) / det), F.relu((a * u_pos - b * u_neg) / det)
    return (w_pos - w_neg).reshape(n, 1, h, w)
