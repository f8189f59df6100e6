"""mdetr-agf: MDETR on today's stack, and why it grounds a phrase where it does (AGF).

Reading order follows the data: ``hub`` (registry, downloads) → ``models`` (``load_model``)
→ ``predict`` → ``explain`` (engine, rules, targets, methods) → ``evaluate`` → ``plot``.
The public names below import on first use, so ``mdetr_agf.hub`` stays light.
"""
import importlib

from .errors import (CheckpointError, DownloadError, FileMissingError, InputError, InputTypeError, MdetrAgfError,
                     ModelBusyError, UnknownNameError)

__version__ = "0.1.0"

_LAZY = {
    "load_model": "mdetr_agf.models",
    "predict": "mdetr_agf.prediction",
    "Detection": "mdetr_agf.prediction",
    "Prediction": "mdetr_agf.prediction",
    "Explanation": "mdetr_agf.explain",
    "explain_classifier": "mdetr_agf.explain",
    "QueryTokenTarget": "mdetr_agf.explain",
    "AlignmentTarget": "mdetr_agf.explain",
    "AnswerTarget": "mdetr_agf.explain",
    "MaskTarget": "mdetr_agf.explain",
    "METHODS": "mdetr_agf.explain",
}


def __getattr__(name):
    if name in ("explain", "plot"):  # submodules (explain is callable: mdetr_agf.explain(model, image, text))
        return importlib.import_module(f"mdetr_agf.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mdetr_agf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + ["explain", "plot"])


__all__ = list(_LAZY) + ["explain", "plot", "MdetrAgfError", "InputError", "InputTypeError", "UnknownNameError",
                         "CheckpointError", "DownloadError", "FileMissingError", "ModelBusyError"]
