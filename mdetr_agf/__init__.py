"""mdetr-agf: MDETR on today's stack, and why it grounds a phrase where it does (AGF).

Reading order follows the data: ``hub`` (registry, downloads) → ``models`` (``load_model``)
→ ``predict`` → ``attribution`` (``core``: engine, rules, composites; ``mdetr``: placement, rules,
targets, methods) → ``explain`` → ``evaluate`` → ``plot``.
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
    "explain": "mdetr_agf.explanation",
    "Explanation": "mdetr_agf.explanation",
    "explain_classifier": "mdetr_agf.attribution.classifier",
    "QueryTokenTarget": "mdetr_agf.attribution.mdetr",
    "AlignmentTarget": "mdetr_agf.attribution.mdetr",
    "AnswerTarget": "mdetr_agf.attribution.mdetr",
    "MaskTarget": "mdetr_agf.attribution.mdetr",
    "METHODS": "mdetr_agf.attribution.mdetr",
    "AGFOptions": "mdetr_agf.attribution.core",
    "agf_composite": "mdetr_agf.attribution.mdetr",
}


def __getattr__(name):
    if name in ("plot", "attribution", "hub"):  # submodules
        return importlib.import_module(f"mdetr_agf.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mdetr_agf' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + ["plot", "attribution", "hub"])


__all__ = list(_LAZY) + ["plot", "attribution", "MdetrAgfError", "InputError", "InputTypeError", "UnknownNameError",
                         "CheckpointError", "DownloadError", "FileMissingError", "ModelBusyError"]
