"""Which rule goes on which module, and the canonizers that make implicit operations visible.

A `Composite` resolves a rule for every module (by name, then special first layer, then by type)
and installs rules and canonizers only inside `with composite.context(model) as tape:`; leaving
the block (also by an exception) removes every hook and restores the model.
"""
import contextlib
import functools
import types

from torch import nn

from ...ops import Add
from .engine import Tape, remove_handles
from .rules import AGF, AGFOptions, Flat, FlatShift, GradientTimesInput, Pass, ZBox, ZRule


class Composite:
    """Maps modules to rules. Each map gives rule factories (called once per module):

    - `name_map`: {qualified name: factory}, or a callable model -> such a dict (placement that
      depends on the architecture); wins over the others;
    - `first_map`: [(types, factory)] for the first module (registration order) of those types;
    - `type_map`: [(types, factory)], first match wins;
    - `canonizers`: callables model -> context manager, entered before rules are resolved.
    Modules without a rule are left alone: autograd carries relevance through them like a gradient.
    """

    def __init__(self, type_map=(), name_map=None, first_map=(), canonizers=()):
        self.type_map, self.name_map, self.first_map = list(type_map), name_map or {}, list(first_map)
        self.canonizers = list(canonizers)

    def rules(self, model):
        """{qualified name: (module, rule)} for every module that gets a rule."""
        names = self.name_map(model) if callable(self.name_map) else self.name_map
        firsts, found = list(self.first_map), {}
        for name, module in model.named_modules():
            first = next((entry for entry in firsts if isinstance(module, entry[0])), None)
            if first is not None:
                firsts.remove(first)  # only the first module of those types
            factory = names.get(name) or (first and first[1]) or self._by_type(module)
            if factory is not None:
                found[name] = (module, factory())
        return found

    def _by_type(self, module):
        return next((factory for types_, factory in self.type_map if isinstance(module, types_)), None)

    @contextlib.contextmanager
    def context(self, model):
        """Canonize `model`, hook its rules, and yield the `Tape` that runs the two streams;
        on exit (normal or not) hooks, records and canonizers are undone in reverse order."""
        tape = Tape()
        with contextlib.ExitStack() as stack:
            stack.callback(tape.close)
            for canonizer in self.canonizers:
                stack.enter_context(canonizer(model))
            for module, rule in self.rules(model).values():
                stack.callback(remove_handles, rule.attach(module, tape))
            yield tape


# ---------------------------------------------------------------- canonizers


@contextlib.contextmanager
def no_inplace(model):
    """In-place activations would overwrite recorded tensors; switch them off, then restore."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    try:
        for m in changed:
            m.inplace = False
        yield
    finally:
        for m in changed:
            m.inplace = True


@contextlib.contextmanager
def resnet_residual_add(model):
    """torchvision's blocks sum the shortcut with `out += identity`; route it through an `Add`
    module (no parameters: the state dict is unchanged) so the z-rule can split it."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    try:
        for block in blocks:
            block.add_module("residual_add", Add())
            block.forward = types.MethodType(_resnet_block_forward, block)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
            block._modules.pop("residual_add", None)


def _resnet_block_forward(self, x):
    """torchvision's BasicBlock/Bottleneck forward with the residual sum made a module."""
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if hasattr(self, "conv3"):
        out = self.bn3(self.conv3(self.relu(out)))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(self.residual_add(out, identity))


# ---------------------------------------------------------------- the reference's placement


def torchvision_agf(options=AGFOptions()):
    """AGF as the authors place it on torchvision ResNets (BasicBlock, Bottleneck) and VGGs."""
    return Composite(
        type_map=[
            ((nn.BatchNorm2d, nn.Dropout), Pass),
            ((nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, Add), ZRule),
            (nn.Conv2d, lambda: AGF(options)),
            (nn.Linear, Flat),
        ],
        first_map=[(nn.Conv2d, ZBox)],
        name_map=reference_placement,
        canonizers=[no_inplace, resnet_residual_add],
    )


def reference_placement(model):
    """The placements that depend on position rather than type:

    - in a residual block only the main convolution gets the full rule (BasicBlock: conv1,
      Bottleneck: conv2); the others and the shortcut convolution are flat;
    - the last Linear starts the propagation (gradient × input of the target);
    - the first Linear after adaptive pooling adds the pooled map's M by delta shift.
    """
    names = {}
    for name, m in model.named_modules():
        if all(hasattr(m, a) for a in ("conv1", "conv2", "downsample")):
            main = "conv2" if hasattr(m, "conv3") else "conv1"
            for conv in ("conv1", "conv2", "conv3"):
                if conv != main and isinstance(getattr(m, conv, None), nn.Conv2d):
                    names[f"{name}.{conv}"] = Flat
            for sub, c in (m.downsample.named_modules() if m.downsample is not None else ()):
                if isinstance(c, nn.Conv2d):
                    names[f"{name}.downsample.{sub}"] = Flat

    pool, linears = None, []
    for name, m in model.named_modules():
        if isinstance(m, nn.AdaptiveAvgPool2d) and not linears:
            pool = m
        elif isinstance(m, nn.Linear):
            linears.append((name, m))
    if linears and pool is not None:
        name, first = linears[0]
        size = pool.output_size if isinstance(pool.output_size, tuple) else (pool.output_size,) * 2
        names[name] = functools.partial(FlatShift, first.in_features // (size[0] * size[1]))
    if linears:
        names[linears[-1][0]] = GradientTimesInput
    return names
