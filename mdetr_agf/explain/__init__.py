"""Attribution by hooks: rules per module, composites that place them, one engine for both AGF streams.

``mdetr_agf.explain(model, image, text, ...)`` is the MDETR entry point: this package is callable
(it forwards to ``api.explain``), so the function and the package can share the name the
design card gives them.
"""
import sys
import types

from .api import Explanation, explain
from .classifier import GaussianSoftmaxTarget, explain_classifier
from .composites import Composite, no_inplace, resnet_residual_add, torchvision_agf
from .engine import Record, Rule, Tape
from .methods import METHODS
from .rules import AGF, AGFOptions, Flat, FlatShift, GradientTimesInput, Pass, ZBox, ZRule
from .targets import AlignmentTarget, AnswerTarget, MaskTarget, QueryTokenTarget

__all__ = [
    "AGF", "AGFOptions", "AlignmentTarget", "AnswerTarget", "Composite", "Explanation", "Flat", "FlatShift",
    "GaussianSoftmaxTarget", "GradientTimesInput", "METHODS", "MaskTarget", "Pass", "QueryTokenTarget", "Record",
    "Rule", "Tape", "ZBox", "ZRule", "explain", "explain_classifier", "no_inplace", "resnet_residual_add",
    "torchvision_agf",
]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return explain(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
