"""What a model takes: the one rule that turns a user's image and caption into model inputs.

``predict``, ``explain``, ``evaluate`` and the scripts all call ``model_input``, so a model sees
the same tensor for the same image whichever door it comes through. MDETR's rule resizes the
shorter side to 800 px with the longer side at most 1333 px; a model trained at another scale
(``model.input_size``, set by ``load_model``: the toy's 160) gets the same rule scaled, the
longer side capped at ``size · 1333 / 800``.
"""
import torch

from . import text as text_utils
from .errors import InputError
from .images import prepare

#: MDETR's training scale: shorter side, and the cap on the longer side.
SIZE, MAX_SIZE = 800, 1333


def scale(size=SIZE):
    """(shorter side, longest side allowed) for a model trained with shorter side ``size``."""
    return size, max(size, round(size * MAX_SIZE / SIZE))


def input_scale(model):
    """(shorter side, longest side allowed) of the images ``model`` takes."""
    return scale(getattr(model, "input_size", None) or SIZE)


def model_dtype(model):
    """The floating dtype of the model's weights, which its inputs are cast to."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) > 1:
        raise InputError(f"the model's weights mix {', '.join(sorted(str(d) for d in dtypes))}; convert it to "
                         f"one dtype first, e.g. model.float() or model.half()")
    return dtypes.pop() if dtypes else torch.float32


def model_input(model, image):
    """``image`` (PIL, path, URL or a normalized 3×H×W tensor, which passes unresized) as ``model``
    takes it: resized by ``input_scale``, normalized, on the model's device and in its dtype.
    Returns (3×h×w tensor, original (width, height))."""
    size, max_size = input_scale(model)
    tensor, original = prepare(image, size=size, max_size=max_size)
    return tensor.to(next(model.parameters()).device, model_dtype(model)), original


def caption_positions(model):
    """Token positions a caption may take, <s> and </s> included: MDETR's 256, or fewer when the
    text encoder has fewer position embeddings (RoBERTa's first two are reserved for padding),
    as the toy model's 64 give 62."""
    from .models.mdetr import core

    embeddings = core(model).transformer.text_encoder.embeddings
    return min(text_utils.MAX_POSITIONS, embeddings.position_embeddings.num_embeddings - embeddings.padding_idx - 1)


def encode_caption(model, caption):
    """Tokenize one caption with the model's tokenizer (validated; at most ``caption_positions``)."""
    return text_utils.tokenize(model.get_tokenizer(), [caption], max_positions=caption_positions(model))
