"""The rules AGF needs beyond the reference's CNN rules, for MDETR's transformer, text encoder
and EfficientNet backbones (placed by `placement.agf_composite`; see docs/agf_rules.md).

Each maps the relevance at a module's output to its tensor inputs without running the layer
again: products and projections use their transposed maps on the recorded operands.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InputTypeError
from ..core.engine import Rule, carries_any
from ..core.rules import GradientTimesInput, abs_share, conv_input_gradient, safe_divide, sample_max, sample_min, shift_by_map


class Start(GradientTimesInput):
    """AGF's start at a target head: x ⊙ ∇x of the target score (as the reference does at the
    classifier's last Linear), with the total noted on the tape so the share of the initial
    relevance that reaches the inputs can be reported (`start_total`)."""

    def attach(self, module, tape):
        self.tape = tape
        return super().attach(module, tape)

    def relevance(self, record, relevance):
        out = super().relevance(record, relevance)
        totals = self.tape.notes.setdefault("start_relevance", {})
        totals[id(record)] = sum(r.detach().sum() for r in out if r is not None)  # a rerun overwrites
        return out


def clear_start(tape):
    """Forget the totals of earlier relevance streams (several targets over one forward)."""
    tape.notes.pop("start_relevance", None)


def start_total(tape):
    """The relevance the `Start` rules put in during the last relevance stream (a 0-d tensor), or None."""
    totals = tape.notes.get("start_relevance")
    return sum(totals.values()) if totals else None


class Terminal(Rule):
    """Where the propagation ends: the module's inputs are integers (token ids, positions) or carry
    no gradient (the position encoding reads the padding mask). What arrives here stays here; at
    the word embeddings that is the token relevance, at position/type embeddings it is absorbed."""

    reads = ()

    def fences(self, n_inputs):
        return False

    def relevance(self, record, relevance):
        return (None,) * len(record.inputs)


class ProjectFlat(Rule):
    """Flat (|x||W| sharing) for `ops.Project`, called as (x, weight, bias): the weight is an input
    (a slice of attention's packed in_proj_weight), so |W| is read from the record."""

    def fences(self, n_inputs):
        return False

    def relevance(self, record, relevance):
        if not carries_any(relevance):  # the Q/K projections: attention passes nothing to A (see AttentionMix)
            return (None,) * len(record.inputs)
        xa, wa = record.x.abs(), record.inputs[1].detach().abs()
        share = safe_divide(relevance, F.linear(xa, wa))
        return (xa * (share @ wa),) + (None,) * (len(record.inputs) - 1)


class AbsoluteSum(Rule):
    """A sum (a residual or embedding sum in the transformers) shared by each operand's absolute
    contribution, R_a = |a| / (|a| + |b|) · R: the sum's counterpart of `Flat` (|x||W| sharing),
    conservative and sign-stable. The signed z-rule gives operands that nearly cancel large
    opposite shares; through the joint encoder's residual sums that noise buried the image map
    (docs/agf_rules.md, "Why the transformer's sums and input_proj have their own rules")."""

    def fences(self, n_inputs):
        return False

    def relevance(self, record, relevance):
        parts = [t.detach().abs() if c else None for t, c in zip(record.inputs, record.carries)]
        total = sum(p.expand(relevance.shape) for p in parts if p is not None)
        share = safe_divide(relevance, total)
        return tuple(None if p is None else (p * share).sum_to_size(p.shape) for p in parts)


class AttributionShift(Rule):
    """`Flat`'s C at the layer where the transformer reads the backbone's map (`input_proj`), plus
    the delta-shifted, max-normalized channel mean of that C: the reference's `FlatShift`, with the
    arriving attribution in place of gradient×activation as the spatial map.

    The transformer's rules are magnitude sharings, so the relevance reaching the image tokens is
    positive almost everywhere; the full AGF rule below factorizes each layer by the *sign* of the
    arriving relevance and has nothing to factor by on an all-positive map. The shift makes
    positions above the map's average positive and the rest negative, keeping the total."""

    def fences(self, n_inputs):
        return False

    def relevance(self, record, relevance):
        c = abs_share(record, self.module, relevance)
        return (shift_by_map(c, F.relu(c.mean(1, keepdim=True)).expand_as(c)),)


_MATMUL_READS = ("inputs", "output")


def _matmul_operands(record):
    a, b = (t.detach() for t in record.inputs)
    return a, b, record.output.detach()


def _unbroadcast(t, like):
    return t if t.shape == like.shape else t.sum_to_size(like.shape)


class AttentionMix(Rule):
    """`ops.MatMul` of A·V (the attention context): the attention probabilities A are held constant
    (a fixed mixing, as in Ali et al., ICML 2022), and V gets all the relevance by the z-rule:
    R_v[k] = Σ_q A[q, k] V[k] · R[q] / Z[q]. A gets none."""

    reads = _MATMUL_READS

    def fences(self, n_inputs):
        return False

    def relevance(self, record, relevance):
        a, v, z = _matmul_operands(record)
        s = safe_divide(relevance, z) * self.module.scale
        rv = _unbroadcast(v * (a.transpose(-2, -1) @ s), v)
        return None, rv if record.carries[1] else None


class Bilinear(Rule):
    """`ops.MatMul` of Q·Kᵀ (attention scores): the z-rule of the bilinear product, split between
    the operands in fixed shares (`share` to the first, the rest to the second), so the total is
    conserved: R_a = share · a ⊙ ((R/Z) bᵀ), R_b = (1 - share) · b ⊙ (aᵀ (R/Z))."""

    reads = _MATMUL_READS

    def __init__(self, share=0.5):
        self.share = share

    def fences(self, n_inputs):
        return False

    def relevance(self, record, relevance):
        if not carries_any(relevance):  # Q·Kᵀ of a transformer: nothing arrives through the held attention
            return None, None
        a, b, z = _matmul_operands(record)
        s = safe_divide(relevance, z) * self.module.scale
        ra = _unbroadcast(a * (s @ b.transpose(-2, -1)), a) * self.share
        rb = _unbroadcast(b * (a.transpose(-2, -1) @ s), b) * (1 - self.share)
        return (ra if record.carries[0] else None, rb if record.carries[1] else None)

    def __repr__(self):
        return f"Bilinear({self.share:g})"


# ---------------------------------------------------------------- TensorFlow "same" padding (timm)


def same_pads(module, x):
    """The (left, right, top, bottom) zero padding timm's `Conv2dSame` adds to `x` before its conv."""
    from timm.layers.padding import get_same_padding

    (ih, iw), (kh, kw) = x.shape[-2:], module.kernel_size
    ph = get_same_padding(int(ih), kh, module.stride[0], module.dilation[0])
    pw = get_same_padding(int(iw), kw, module.stride[1], module.dilation[1])
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2


def is_same_padded(module):
    """timm's dynamic 'same'-padded convolution (stride 2 in TF EfficientNets)."""
    try:
        from timm.layers import Conv2dSame
    except ImportError:  # pragma: no cover - timm is a dependency
        return False
    return isinstance(module, Conv2dSame)


def _crop(t, pads):
    return F.pad(t, [-p for p in pads]) if any(pads) else t


def _pad(t, pads):
    return None if t is None else (F.pad(t.detach(), pads) if any(pads) else t.detach())


class _PaddedRecord:
    """A `Record` seen from the padded input: what the inner rule of `SamePadding` reads. Gradients
    at the input are zero on the padding, as for the implicit padding of an ordinary convolution."""

    def __init__(self, record, pads):
        self.inputs = (_pad(record.inputs[0], pads),) + tuple(record.inputs[1:])
        self.output, self.grad_output, self.carries = record.output, record.grad_output, record.carries
        self._record, self._pads = record, pads

    @property
    def x(self):
        return self.inputs[0]

    def gradient(self):
        return self._record.gradient()

    def cached(self, key, compute):
        return self._record.cached(("padded", key), compute)

    def input_gradient(self, i=0):
        g = self._record.input_gradient(i)
        return _pad(g, self._pads) if i == 0 else g


class SamePadding(Rule):
    """Runs any convolution rule on timm's `Conv2dSame`: pads the recorded input exactly as timm
    does (`pad_same`), lets `inner` see an ordinary unpadded convolution of the padded input, and
    crops its relevance back to the input. The C-sharing part is exact (the padding holds zeros,
    so it gets no share); the input-agnostic A term of the full rule counts the padding as inputs,
    which moves (never loses) relevance among border pixels. Rules that differentiate the recorded
    graph (ZRule) are not supported here."""

    same_padding = True

    def __init__(self, inner):
        self.inner = inner

    @property
    def reads(self):
        return self.inner.reads

    def attach(self, module, tape):
        proxy = copy.copy(module)  # shares the parameters; never called
        proxy.padding = (0, 0)
        self.inner.module = proxy
        return super().attach(module, tape)

    def fences(self, n_inputs):
        return self.inner.fences(n_inputs)

    def relevance(self, record, relevance):
        pads = same_pads(self.module, record.inputs[0])
        out = self.inner.relevance(_PaddedRecord(record, pads), relevance)
        return (None if out[0] is None else _crop(out[0], pads),) + tuple(out[1:])

    def __repr__(self):
        return f"SamePadding({self.inner!r})"


class ZBoxSame(Rule):
    """z^B (per-sample min/max bounds) for a first layer that is timm's `Conv2dSame`: the padding
    is a fixed zero, not a bounded input, so the bound terms are taken over the image only and
    the relevance is conserved exactly on the pixels."""

    same_padding = True

    def fences(self, n_inputs):
        return False

    def relevance(self, record, relevance):
        module, x = self.module, record.x
        if not isinstance(module, nn.Conv2d) or module.padding_mode != "zeros":
            raise InputTypeError(f"ZBoxSame expects a zero-padded Conv2d, got {module}")
        pads = same_pads(module, x) if is_same_padded(module) else (0, 0, 0, 0)
        if not is_same_padded(module) and any(module.padding):
            raise InputTypeError("ZBoxSame handles timm's Conv2dSame; use ZBox for numeric padding")
        xp, inside = F.pad(x, pads), F.pad(torch.ones_like(x[:1]), pads)
        w = module.weight
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        low, high = sample_min(x), sample_max(x)

        def conv(t, weight):
            return F.conv2d(t, weight, None, module.stride, 0, module.dilation, module.groups)

        def conv_t(t, weight):
            return conv_input_gradient(t, xp, weight, module.stride, 0, module.dilation, module.groups)

        z = conv(xp, w) - low * conv(inside, wp) - high * conv(inside, wn)
        s = safe_divide(relevance, z)
        r = (xp - low) * conv_t(s, wp) + (xp - high) * conv_t(s, wn)
        return (_crop(r, pads),)
