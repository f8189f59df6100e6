"""mdetr-agf: MDETR on today's stack, and why it grounds a phrase where it does (AGF).

Reading order follows the data: ``hub`` (registry, downloads) → ``models`` (``load_model``)
→ ``predict`` → ``explain`` (engine, rules, targets, methods) → ``evaluate`` → ``plot``.
"""
from .errors import CheckpointError, DownloadError, InputError, InputTypeError, MdetrAgfError, UnknownNameError
from .models import load_model
from .predict import Detection, Prediction, predict

__version__ = "0.1.0"


def __getattr__(name):
    # Explainers import lazily so that `import mdetr_agf` stays light for prediction-only use.
    if name in ("explain", "explain_classifier"):
        from . import explain as _explain

        return getattr(_explain, name)
    raise AttributeError(f"module 'mdetr_agf' has no attribute {name!r}")


__all__ = ["load_model", "predict", "Detection", "Prediction", "explain", "explain_classifier",
           "MdetrAgfError", "InputError", "InputTypeError", "UnknownNameError", "CheckpointError", "DownloadError"]
