"""Attribution by hooks: rules per module, composites that place them, one engine for both AGF streams."""
from .classifier import GaussianSoftmaxTarget, explain_classifier
from .composites import Composite, no_inplace, resnet_residual_add, torchvision_agf
from .engine import Record, Rule, Tape
from .rules import AGF, AGFOptions, Flat, FlatShift, GradientTimesInput, Pass, ZBox, ZRule

__all__ = [
    "AGF", "AGFOptions", "Composite", "Flat", "FlatShift", "GaussianSoftmaxTarget", "GradientTimesInput",
    "Pass", "Record", "Rule", "Tape", "ZBox", "ZRule", "explain_classifier", "no_inplace",
    "resnet_residual_add", "torchvision_agf",
]
