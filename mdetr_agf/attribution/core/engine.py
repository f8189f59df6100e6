"""Two backward streams over one recorded forward: the true gradient, then the relevance.

AGF needs, at every layer, both the relevance arriving at its output and the true gradient there.
A rule's hooks wrap each tensor input of its module in `_Entry` and the output in `_Bridge`,
identities whose backward depends on the stream the `Tape` is running:

- gradient stream: the gradients at the output and at each input (this call's share only) are
  stored on the call's `Record`; the gradient itself flows through the module's own autograd
  graph, so every module gets its exact gradient with no extra code;
- relevance stream: the module's internal graph is cut off (no gradient is sent into it) and the
  rule maps the incoming relevance straight to relevance at the module's inputs. The entries
  also fence the module's graph: a vector-Jacobian product from the output to the entries stays
  local even when one input depends on another (Q and K of attention both come from X).

Between hooked modules autograd carries both streams, so plain tensor operations (flatten, reshape,
permute, cat, indexing) need no rule: they move relevance exactly as they move gradients. A module
called several times (torchvision's shared ReLU) gets one `Record` per call.
"""
from functools import partial

import torch
from torch import Tensor, nn

from ...errors import InputTypeError


def carries_any(t):
    """Whether t has a non-zero element (``t.any()`` in one min/max pass, a third of its cost)."""
    if t.numel() == 0:
        return False
    low, high = torch.aminmax(t)
    return bool(low != 0) or bool(high != 0)

GRADIENT = "gradient"
RELEVANCE = "relevance"


class Record:
    """One call of a hooked module: its tensor inputs (as the module saw them) and output, and,
    once `Tape.gradient` has run, the true gradients at the output and at each input.

    A record keeps only what its rule `reads` (the rest is None), so it holds no tensor autograd
    would have freed; `carries[i]` says whether input i carries a gradient either way."""

    __slots__ = ("inputs", "output", "grad_output", "grad_inputs", "memo", "_carries", "cache")

    def __init__(self, n_inputs):
        self.inputs, self.output = (None,) * n_inputs, None
        self.grad_output, self.grad_inputs = None, [None] * n_inputs
        self.memo, self._carries, self.cache = {}, None, None

    @property
    def carries(self):
        """Whether each input carries a gradient (relevance goes only there)."""
        if self._carries is None:
            return tuple(t is not None and t.requires_grad for t in self.inputs)
        return self._carries

    def cached(self, key, compute):
        """What a rule derives from the forward alone (e.g. the layer applied to |x| and |W|):
        kept on the record only while later targets over the same forward will reuse it (`cache`,
        set by `Tape.relevance(..., retain=True)`) and the tape's cache budget allows; otherwise
        computed when needed and dropped with the record."""
        if key in self.memo:
            return self.memo[key]
        value = compute()
        if self.cache is not None and self.cache.take(value.nbytes):
            self.memo[key] = value
        return value

    def consumed(self, final):
        """The rule has run on this record: its gradients are spent (the next target's gradient
        stream writes new ones); after the last relevance stream everything else is too."""
        self.grad_output, self.grad_inputs = None, [None] * len(self.grad_inputs)
        if final:
            self.inputs, self.output, self.memo = (None,) * len(self.inputs), None, {}

    @property
    def x(self):
        """The first input, detached: what most rules compute with."""
        return self.inputs[0].detach()

    def gradient(self):
        """The true gradient at the output."""
        return _required(self.grad_output)

    def input_gradient(self, i=0):
        """The true gradient at input i, this call's share only (the layer's own Jacobian)."""
        return _required(self.grad_inputs[i])


def _required(grad):
    if grad is None:
        raise RuntimeError("this rule needs the true gradient: run Tape.gradient before Tape.relevance")
    return grad


class Rule:
    """Attached to one module. Records every call in the forward; in the relevance stream maps the
    relevance at the module's output to one relevance per tensor input (None where there is none)."""

    module = None
    #: What `relevance` reads from a record: any of "inputs", "output", "gradient" (at the output)
    #: and "input_gradient". The tape keeps nothing else, so memory stays near a plain backward's.
    reads = ("inputs",)
    #: False for rules whose relevance is zero wherever the incoming relevance is zero (nearly all):
    #: the tape then skips them when nothing arrives (e.g. the attention-score branch). True for
    #: rules that start the propagation themselves (gradient × input at a target's head).
    starts_relevance = False
    #: Whether the tape checks the incoming relevance for all zeros and skips the rule then (False
    #: for rules so cheap that the check would cost more than running them).
    skips_zero = True

    def attach(self, module, tape):
        """Hook `module`; returns the handles to remove."""
        self.module, calls = module, []  # records of calls under way (a stack: calls may nest)
        # prepend: the rule's hooks run before any other hook on the module, so a hook that reads the
        # output (a `Capture`) sees the bridged tensor whatever order the two were registered in
        return [module.register_forward_pre_hook(partial(tape.enter, self, calls), with_kwargs=True, prepend=True),
                module.register_forward_hook(partial(tape.leave, self, calls), with_kwargs=True, prepend=True)]

    def relevance(self, record, relevance):
        raise NotImplementedError

    def fences(self, n_inputs):
        """Whether to wrap the inputs in entries: needed for `Record.input_gradient` and for a local
        vector-Jacobian product of a module with several inputs; rules that need neither save the cost."""
        return True

    def __repr__(self):
        return type(self).__name__


class _Entry(torch.autograd.Function):
    """Identity on one input of a hooked module; stores that input's true gradient."""

    @staticmethod
    def forward(ctx, tape, record, index, keep, x):
        ctx.hooked = (tape, record, index, keep)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        tape, record, index, keep = ctx.hooked
        if tape.stream == GRADIENT and keep:
            record.grad_inputs[index] = grad
        return None, None, None, None, grad


class _Bridge(torch.autograd.Function):
    """Identity on a module's output that routes the backward by the tape's stream (module doc)."""

    @staticmethod
    def forward(ctx, tape, rule, record, output, *inputs):
        ctx.hooked, ctx.n_inputs = (tape, rule, record), len(inputs)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        tape, rule, record = ctx.hooked
        skip = (None, None, None)
        if tape.stream == RELEVANCE:
            if rule.skips_zero and not rule.starts_relevance and not carries_any(grad):
                record.consumed(tape.final)
                return (*skip, None) + (None,) * ctx.n_inputs  # nothing arrives: nothing to share
            relevance = tuple(rule.relevance(record, grad))
            record.consumed(tape.final)  # nothing is kept for a module the pass has left
            if len(relevance) != ctx.n_inputs:
                raise RuntimeError(f"{rule!r} gave {len(relevance)} relevances for {ctx.n_inputs} inputs")
            return (*skip, None, *relevance)
        if tape.stream == GRADIENT and "gradient" in rule.reads:
            record.grad_output = grad
        return (*skip, grad) + (None,) * ctx.n_inputs  # outside a pass: a plain gradient


class CacheBudget:
    """Bytes the forward-only terms of the records may hold while several targets share a forward:
    a fraction of what the records themselves hold, so caching buys time (the pass skips the
    layer's |x|·|W| map) without multiplying the memory of an explanation."""

    FRACTION = 0.05

    def __init__(self, records):
        storages = {}
        for record in records:
            for t in (*record.inputs, record.output):
                if t is not None:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        self.left = self.FRACTION * sum(storages.values())

    def take(self, nbytes):
        if nbytes > self.left:
            return False
        self.left -= nbytes
        return True


class Tape:
    """Handed out by `Composite.context`: records the hooked forward and runs the two streams."""

    def __init__(self):
        self.stream, self.records, self.final, self.cache = None, [], False, None
        #: What rules note for the caller during a stream (e.g. the relevance a start rule put in),
        #: by key; cleared with the records.
        self.notes = {}

    def close(self):
        """Drop every record: autograd nodes hold their records, which hold tensors whose graph
        leads back to those nodes; clearing them breaks the cycles so the graph can be freed."""
        for record in self.records:
            record.inputs = record.output = record.grad_output = record.grad_inputs = record.memo = None
        self.final, self.cache = False, None
        self.records.clear()
        self.notes.clear()

    def enter(self, rule, calls, module, args, kwargs):
        """Forward pre-hook of every rule: note the tensor inputs, fence those that carry gradients."""
        if not torch.is_grad_enabled():
            calls.append(None)
            return None
        values = [*args, *kwargs.values()]
        slots = [i for i, v in enumerate(values) if isinstance(v, Tensor)]
        record, fence = Record(len(slots)), rule.fences(len(slots))
        keep = "input_gradient" in rule.reads
        for n, i in enumerate(slots):
            if fence and values[i].requires_grad:
                values[i] = _Entry.apply(self, record, n, keep, values[i])
        record.inputs = tuple(values[i] for i in slots)
        record._carries = tuple(t.requires_grad for t in record.inputs)
        calls.append(record)
        self.records.append(record)
        if not fence:
            return None
        return tuple(values[:len(args)]), dict(zip(kwargs, values[len(args):]))

    def leave(self, rule, calls, module, args, kwargs, output):
        """Forward hook of every rule: bridge the output."""
        record = calls.pop()
        if record is None:
            return None
        if not isinstance(output, Tensor):
            if any(t.requires_grad for t in record.inputs):
                raise InputTypeError(f"{rule!r} on {type(module).__name__}: only single-tensor outputs are supported")
            return None
        if not output.requires_grad:
            record.inputs = (None,) * len(record.inputs)
            return None
        bridged = _Bridge.apply(self, rule, record, output, *record.inputs)
        if "output" in rule.reads:
            record.output = output
        if "inputs" not in rule.reads:
            record.inputs = (None,) * len(record.inputs)
        return bridged

    def gradient(self, outputs, inputs, grad_outputs=None):
        """True gradient of `outputs` w.r.t. `inputs`; stores the gradients at every hooked module."""
        return self._run(GRADIENT, outputs, inputs, grad_outputs)

    def relevance(self, outputs, inputs, relevance=None, *, retain=True):
        """Relevance at `inputs`, seeded with `relevance` at `outputs` (default zeros: the rule at the
        top then starts the propagation itself, as AGF's gradient-times-input start does).

        retain: whether more streams will run over this forward (another target). If so, the
        recorded forward is kept, and so are the forward-only terms the rules compute
        (`Record.cached`); pass False for the last stream, which then frees the forward as it
        moves down, as an ordinary backward does: a single explanation costs little more memory
        than a forward + backward."""
        if relevance is None:
            relevance = [torch.zeros_like(t) for t in ((outputs,) if isinstance(outputs, Tensor) else outputs)]
        self.final = not retain
        if retain and self.cache is None:
            self.cache = CacheBudget(self.records)
        for record in self.records:
            record.cache = self.cache if retain else None
        return self._run(RELEVANCE, outputs, inputs, relevance, retain)

    def _run(self, stream, outputs, inputs, seeds, retain=True):
        self.stream = stream
        try:
            return torch.autograd.grad(outputs, inputs, seeds, retain_graph=retain, allow_unused=True)
        finally:
            self.stream = None


def remove_handles(handles):
    for handle in handles:
        handle.remove()


def hooked(model: nn.Module):
    """Every hook registered on `model` or its children (nothing may leak out of a context)."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
    return [(m, name, h) for m in model.modules() for name in names for h in getattr(m, name, {}).values()]
