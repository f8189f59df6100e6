"""Two backward streams over one recorded forward: the true gradient, then the relevance.

AGF needs, at every layer, both the relevance arriving at its output and the true gradient there.
A rule's forward hook wraps the module's output in `_Bridge`, an identity whose backward depends on
the stream the `Tape` is running:

- gradient stream: the incoming gradient is stored on the call's `Record` and passed on through the
  module's own autograd graph, so every module gets its exact gradient with no extra code;
- relevance stream: the module's internal graph is cut off (no gradient is sent into it) and the
  rule maps the incoming relevance straight to relevance at the module's tensor inputs.

Between hooked modules autograd carries both streams, so plain tensor operations (flatten, reshape,
permute, cat, indexing) need no rule: they move relevance exactly as they move gradients. A module
called several times (torchvision's shared ReLU) gets one `Record` per call.
"""
from functools import partial

import torch
from torch import Tensor, nn

from ..errors import InputTypeError

GRADIENT = "gradient"
RELEVANCE = "relevance"


class Record:
    """One call of a hooked module: its tensor inputs and output as autograd saw them, and the true
    gradient at that output once `Tape.gradient` has run."""

    __slots__ = ("inputs", "output", "grad_output")

    def __init__(self, inputs, output):
        self.inputs, self.output, self.grad_output = inputs, output, None

    @property
    def x(self):
        """The first input, detached: what most rules compute with."""
        return self.inputs[0].detach()

    def gradient(self):
        """The true gradient at the output; rules that need it fail loudly without it."""
        if self.grad_output is None:
            raise RuntimeError("this rule needs the true gradient: run Tape.gradient before Tape.relevance")
        return self.grad_output


class Rule:
    """Attached to one module. Records every call in the forward; in the relevance stream maps the
    relevance at the module's output to one relevance per tensor input (None where there is none)."""

    module = None

    def attach(self, module, tape):
        """Hook `module`; returns the handles to remove."""
        self.module = module
        return [module.register_forward_hook(partial(tape.record, self), with_kwargs=True)]

    def relevance(self, record, relevance):
        raise NotImplementedError

    def __repr__(self):
        return type(self).__name__


class _Bridge(torch.autograd.Function):
    """Identity on a module's output that routes the backward by the tape's stream (see module doc)."""

    @staticmethod
    def forward(ctx, tape, rule, record, output, *inputs):
        ctx.hooked = (tape, rule, record)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        tape, rule, record = ctx.hooked
        skip = (None, None, None)
        if tape.stream == RELEVANCE:
            relevance = tuple(rule.relevance(record, grad))
            if len(relevance) != len(record.inputs):
                raise RuntimeError(f"{rule!r} returned {len(relevance)} relevances for {len(record.inputs)} inputs")
            return (*skip, None, *relevance)
        if tape.stream == GRADIENT:
            record.grad_output = grad
        return (*skip, grad) + (None,) * len(record.inputs)  # outside a pass: a plain gradient


class Tape:
    """Handed out by `Composite.context`: records the hooked forward and runs the two streams."""

    def __init__(self):
        self.stream = None

    def record(self, rule, module, args, kwargs, output):
        """Forward hook body shared by all rules."""
        if not torch.is_grad_enabled():
            return None
        if not isinstance(output, Tensor):
            raise InputTypeError(f"{rule!r} on {type(module).__name__}: only single-tensor outputs are supported")
        if not output.requires_grad:
            return None
        inputs = tuple(t for t in (*args, *kwargs.values()) if isinstance(t, Tensor))
        return _Bridge.apply(self, rule, Record(inputs, output), output, *inputs)

    def gradient(self, outputs, inputs, grad_outputs=None):
        """True gradient of `outputs` w.r.t. `inputs`; stores the gradient at every hooked output."""
        return self._run(GRADIENT, outputs, inputs, grad_outputs)

    def relevance(self, outputs, inputs, relevance=None):
        """Relevance at `inputs`, seeded with `relevance` at `outputs` (zeros: the rule at the top
        starts the propagation itself, as AGF's gradient-times-input start does)."""
        if relevance is None:
            relevance = [torch.zeros_like(t) for t in _as_tuple(outputs)]
        return self._run(RELEVANCE, outputs, inputs, relevance)

    def _run(self, stream, outputs, inputs, seeds):
        self.stream = stream
        try:
            return torch.autograd.grad(outputs, inputs, seeds, retain_graph=True, allow_unused=True)
        finally:
            self.stream = None


def _as_tuple(t):
    return (t,) if isinstance(t, Tensor) else tuple(t)


def remove_handles(handles):
    for handle in handles:
        handle.remove()


def hooked(module: nn.Module):
    """Every hook registered on `module` or its children (tests: nothing must leak)."""
    found = []
    for m in module.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            found += [(m, name, h) for h in getattr(m, name, {}).values()]
    return found
