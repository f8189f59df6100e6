"""The generic attribution machinery: rules attached to modules by hooks, composites that place
them, and one engine that runs the true gradient and the relevance over one recorded forward.

Nothing here knows MDETR: it serves any ``torch.nn.Module`` (``attribution.classifier`` uses it
on torchvision classifiers, ``attribution.mdetr`` on MDETR).
"""
from .borrow import borrowed
from .composites import Composite, no_inplace, reference_placement, resnet_residual_add, torchvision_agf
from .engine import CacheBudget, Record, Rule, Tape
from .rules import AGF, AGFOptions, Flat, FlatShift, GradientTimesInput, Pass, ZBox, ZRule

__all__ = ["AGF", "AGFOptions", "CacheBudget", "Composite", "Flat", "FlatShift", "GradientTimesInput", "Pass",
           "Record", "Rule", "Tape", "ZBox", "ZRule", "borrowed", "no_inplace", "reference_placement",
           "resnet_residual_add", "torchvision_agf"]
