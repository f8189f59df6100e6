"""``predict``: an image and a caption in, boxes tied to caption phrases out.

Post-processing follows MDETR's: a query is kept when its probability of *not* being
"no object" exceeds the threshold; the caption tokens it grounds are those its softmax over
the 256 token positions gives more than 0.1; boxes are scaled to the original image.
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
from .images import prepare
from .locking import one_at_a_time

TOKEN_THRESHOLD = 0.1


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


def model_dtype(model):
    """The floating dtype of the model's weights, which its inputs are cast to."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) > 1:
        raise InputError(f"the model's weights mix {', '.join(sorted(str(d) for d in dtypes))}; convert it to "
                         f"one dtype first, e.g. model.float() or model.half()")
    return dtypes.pop() if dtypes else torch.float32


def model_image(model, image):
    """``image`` as the model takes it: resized by MDETR's rule at the scale the model was trained
    at, normalized, on the model's device and in its dtype. Returns (3×h×w, original (w, h))."""
    size = getattr(model, "input_size", None)  # set by load_model for models not trained at 800 px
    if size:
        tensor, original = prepare(image, size=size, max_size=max(size, round(size * 1333 / 800)))
    else:
        tensor, original = prepare(image)
    return tensor.to(next(model.parameters()).device, model_dtype(model)), original


def _check_fraction(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be a number between 0 and 1, got {type(value).__name__} {value!r}")
    if not 0 <= value <= 1:  # NaN fails too
        raise InputError(f"{name} must be between 0 and 1 (a probability), got {value!r}")
    return float(value)


def grounded_tokens(logits_row, num_tokens):
    probs = logits_row.softmax(-1)[:num_tokens]
    return [int(t) for t in torch.nonzero(probs > TOKEN_THRESHOLD).flatten()]


def tokens_text(encoding, caption, tokens):
    """The caption text of these token positions (separate runs joined by a space)."""
    return " ".join(caption[a:b] for a, b in text_utils.tokens_to_char_spans(encoding, 0, tokens))


def best_query(candidates, tokens):
    """The query that stands for a phrase (``tokens``: its caption positions), so that each object
    a caption names is drawn and explained once: of the ``candidates`` — ``(query, score,
    grounded tokens)`` — that ground any of these tokens, the most confident; None when none does."""
    wanted = set(tokens)
    grounding = [(score, query) for query, score, grounds in candidates if wanted & set(grounds)]
    return max(grounding)[1] if grounding else None


def query_for_tokens(logits, tokens, num_tokens):
    """``best_query`` over every query of one caption's ``logits`` (Q × 256); when no query grounds
    the tokens, the one that puts the most probability on them."""
    scores = 1 - logits.softmax(-1)[:, -1]
    candidates = [(q, float(scores[q]), grounded_tokens(logits[q], num_tokens)) for q in range(logits.shape[0])]
    query = best_query(candidates, tokens)
    return query if query is not None else int(logits.softmax(-1)[:, list(tokens)].sum(-1).argmax())


def one_per_phrase(detections):
    """The detections to show and explain: for each phrase, the one ``best_query`` picks among the
    detections for its tokens (duplicates of a phrase dropped), most confident first."""
    candidates = [(d.query, d.score, d.tokens) for d in detections]
    by_query = {d.query: d for d in detections}
    chosen = []
    for d in sorted(detections, key=lambda d: -d.score):
        best = by_query[best_query(candidates, d.tokens) if d.tokens else d.query]
        if all(best is not c and best.phrase != c.phrase for c in chosen):
            chosen.append(best)
    return chosen


@torch.no_grad()
def predict(model, image, caption, threshold=0.7, mask_threshold=0.5):
    """Detections of ``caption``'s phrases in ``image`` whose score exceeds ``threshold``.

    One call at a time per model: calls from other threads wait (``mdetr_agf.locking``)."""
    threshold = _check_fraction(threshold, "threshold")
    mask_threshold = _check_fraction(mask_threshold, "mask_threshold")
    with one_at_a_time(model, "predict"):
        return _predict(model, image, caption, threshold, mask_threshold)


def _predict(model, image, caption, threshold, mask_threshold):
    tensor, (width, height) = model_image(model, image)
    encoding = encode_caption(model, caption)
    out = model(images=[tensor], text={"input_ids": encoding["input_ids"],
                                       "attention_mask": encoding["attention_mask"]})
    num_tokens = int(encoding["attention_mask"][0].sum())
    scores = 1 - out["pred_logits"][0].softmax(-1)[:, -1]
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
