"""``predict``: an image and a caption in, boxes tied to caption phrases out.

Post-processing follows MDETR's: a query is kept when its probability of *not* being
"no object" exceeds the threshold; the caption tokens it grounds are those ``grounding``
names; boxes are scaled to the original image. Inputs are made by ``inputs.model_input``.
"""
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert

from . import text as text_utils
from .answers import decode_answer
from .errors import InputError, InputTypeError
from .grounding import grounded_tokens, object_scores
from .inputs import encode_caption, model_input
from .locking import one_at_a_time


@dataclass
class Detection:
    query: int
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels
    tokens: list[int]  # token positions (into the tokenized caption) this box grounds
    spans: list[tuple[int, int]]  # character spans of the caption
    phrase: str
    mask: np.ndarray | None = None  # H×W bool, PhraseCut models only


@dataclass
class Prediction:
    caption: str
    image_size: tuple[int, int]  # width, height
    detections: list[Detection]
    answer: str | None = None
    outputs: dict = field(default_factory=dict, repr=False)
    encoding: object = field(default=None, repr=False)


def box_cxcywh_to_xyxy(boxes, width, height):
    """MDETR's normalized (cx, cy, w, h) → pixel (x0, y0, x1, y1) in an image of this size."""
    scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    return box_convert(boxes, "cxcywh", "xyxy") * scale


def _check_fraction(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be a number between 0 and 1, got {type(value).__name__} {value!r}")
    if not 0 <= value <= 1:  # NaN fails too
        raise InputError(f"{name} must be between 0 and 1 (a probability), got {value!r}")
    return float(value)


def tokens_text(encoding, caption, tokens):
    """The caption text of these token positions (separate runs joined by a space)."""
    return " ".join(caption[a:b] for a, b in text_utils.tokens_to_char_spans(encoding, 0, tokens))


@torch.no_grad()
def predict(model, image, caption, threshold=0.7, mask_threshold=0.5):
    """Detections of ``caption``'s phrases in ``image`` whose score exceeds ``threshold``.

    One call at a time per model: calls from other threads wait (``mdetr_agf.locking``)."""
    threshold = _check_fraction(threshold, "threshold")
    mask_threshold = _check_fraction(mask_threshold, "mask_threshold")
    with one_at_a_time(model, "predict"):
        return _predict(model, image, caption, threshold, mask_threshold)


def _predict(model, image, caption, threshold, mask_threshold):
    tensor, (width, height) = model_input(model, image)
    encoding = encode_caption(model, caption)
    out = model(images=[tensor], text={"input_ids": encoding["input_ids"],
                                       "attention_mask": encoding["attention_mask"]})
    num_tokens = int(encoding["attention_mask"][0].sum())
    scores = object_scores(out["pred_logits"][0])
    boxes = box_cxcywh_to_xyxy(out["pred_boxes"][0], width, height)
    masks = out.get("pred_masks")
    detections = []
    for q in torch.nonzero(scores > threshold).flatten().tolist():
        tokens = grounded_tokens(out["pred_logits"][0, q], num_tokens)
        spans = text_utils.tokens_to_char_spans(encoding, 0, tokens)
        mask = None
        if masks is not None:
            upsampled = F.interpolate(masks[:, q:q + 1], size=(height, width), mode="bilinear", align_corners=False)
            mask = (upsampled[0, 0].sigmoid() > mask_threshold).cpu().numpy()
        detections.append(Detection(q, float(scores[q]), tuple(float(v) for v in boxes[q]), tokens, spans,
                                    tokens_text(encoding, caption, tokens), mask))
    detections.sort(key=lambda d: -d.score)
    answer = decode_answer(model, out) if getattr(model, "qa_dataset", None) else None
    return Prediction(caption, (width, height), detections, answer, out, encoding)
