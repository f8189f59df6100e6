"""MDETR architectures (``build``) and the one door to a ready model (``load_model``)."""
from .build import FAMILIES, ModelConfig, build_model
from .loading import load_model

__all__ = ["FAMILIES", "ModelConfig", "build_model", "load_model"]
