"""Attribution by hooks. ``core``: the generic engine, rules and composites (no MDETR in it);
``classifier``: AGF on torchvision classifiers (the reference's setting); ``mdetr``: placement,
rules, targets and methods for MDETR. Names import on first use, so ``attribution.core`` stays
free of the models.
"""
import importlib

_HOME = {
    **dict.fromkeys(["AGF", "AGFOptions", "Composite", "Flat", "FlatShift", "GradientTimesInput", "Pass", "Record",
                     "Rule", "Tape", "ZBox", "ZRule", "no_inplace", "resnet_residual_add", "torchvision_agf"],
                    "mdetr_agf.attribution.core"),
    **dict.fromkeys(["GaussianSoftmaxTarget", "explain_classifier"], "mdetr_agf.attribution.classifier"),
    **dict.fromkeys(["AlignmentTarget", "AnswerTarget", "MaskTarget", "QueryTokenTarget", "METHODS",
                     "DEFAULT_SCORES", "SCORES", "agf_composite"], "mdetr_agf.attribution.mdetr"),
}


def __getattr__(name):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'mdetr_agf.attribution' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_HOME))


__all__ = sorted(_HOME)
