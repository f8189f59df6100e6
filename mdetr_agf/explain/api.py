"""``explain``: one door to every method, with the inputs ``predict`` takes.

It prepares the image and caption exactly as prediction does, picks a target when none is
given (the best detection, or the phrase / tokens / query the user named), validates every
choice with an error that says what is allowed, and returns an ``Explanation`` whose image
map has the original image's resolution.
"""
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import text as text_utils
from ..errors import InputError, InputTypeError, UnknownNameError
from ..images import prepare
from ..prediction import grounded_tokens, query_for_tokens, tokens_text
from .methods import DEFAULT_SCORES, METHODS, Run
from .targets import AnswerTarget, QueryTokenTarget, check_score, core


@dataclass
class Explanation:
    image: torch.Tensor  # (H, W) relevance at the original image's resolution
    tokens: torch.Tensor  # (T,) relevance of each non-padding caption token
    token_strings: list[str]  # the tokens as text (special tokens included)
    target: object
    method: str
    caption: str | None = None
    grid: torch.Tensor | None = None  # relevance over the backbone grid (h×w)
    input_image: torch.Tensor | None = field(default=None, repr=False)  # normalized model input (3×h×w)
    input_map: torch.Tensor | None = field(default=None, repr=False)  # relevance at the input resolution
    extras: dict = field(default_factory=dict)
    score: str | None = None  # the target score explained (``targets.SCORES``); None: the method takes none
    phrase: str | None = None  # the caption text the target's tokens cover (figure titles name it)


def _encode_text(model, text):
    """(model text input, encoding with offsets or None, caption or None)."""
    if isinstance(text, str):
        encoding = text_utils.tokenize(core(model).get_tokenizer(), [text])
        return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}, encoding, text
    if isinstance(text, Mapping) and "input_ids" in text:
        ids = torch.as_tensor(text["input_ids"])
        ids = ids[None] if ids.dim() == 1 else ids
        mask = torch.as_tensor(text.get("attention_mask", torch.ones_like(ids)))
        mask = mask[None] if mask.dim() == 1 else mask
        if ids.shape[0] != 1 or ids.shape != mask.shape:
            raise InputError(f"explain takes one caption: input_ids of shape (1, T), got {tuple(ids.shape)}")
        return {"input_ids": ids, "attention_mask": mask}, text if "offset_mapping" in text else None, None
    raise InputTypeError(f"text must be a caption string or a mapping with input_ids, not {type(text).__name__}")


def _token_strings(model, ids):
    tokenizer = core(model).tokenizer
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [t.replace("Ġ", " ").strip() or t for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def _check_index(value, upper, what):
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{what} must be an int, got {type(value).__name__}")
    if not 0 <= value < upper:
        raise UnknownNameError(f"{what} {value} is out of range: allowed 0 … {upper - 1}")
    return value


def default_targets(model, out, num_tokens, *, query, tokens, phrase, caption, encoding):
    """Resolve the user's query / tokens / phrase into a target (see ``explain``)."""
    num_queries = out["pred_logits"].shape[1]
    if phrase is not None:
        if encoding is None or caption is None:
            raise InputError("phrase= needs the caption as a string (token ids carry no text)")
        tokens = text_utils.phrase_tokens(encoding, caption, phrase)
    if tokens is not None:
        tokens = [tokens] if isinstance(tokens, int) and not isinstance(tokens, bool) else list(tokens)
        if not tokens:
            raise InputError("tokens= is empty: name at least one token position")
        for t in tokens:
            _check_index(t, num_tokens, "token position")
    probs = out["pred_logits"][0].softmax(-1)
    if query is None:
        if tokens is not None:  # the box drawn for these tokens (one per phrase)
            query = query_for_tokens(out["pred_logits"][0], tokens, num_tokens)
        else:
            query = int((1 - probs[:, -1]).argmax())
    query = _check_index(query, num_queries, "query")
    if tokens is None:
        tokens = grounded_tokens(out["pred_logits"][0, query], num_tokens) or [int(probs[query, :num_tokens].argmax())]
    return QueryTokenTarget(query, tuple(tokens))


def explain(model, image, text, *, query=None, tokens=None, phrase=None, target=None, method="agf", score=None):
    """Explain one grounding (or a list of targets) of ``text`` in ``image``.

    ``query``: a detection slot (default: the most confident); ``tokens``: caption token positions
    (default: those the query grounds); ``phrase``: a phrase of the caption, in place of tokens;
    ``target``: a target object (``QueryTokenTarget``, ``AlignmentTarget``, ``AnswerTarget``,
    ``MaskTarget``) or a list of them, which returns a list of explanations from one forward.
    ``method``: one of ``METHODS``. ``score``: the target's scalar whose gradient is explained,
    ``"logit"`` (the raw logit summed over the phrase's tokens), ``"softmax"`` (the probability
    mass on them) or ``"agf"`` (AGF's Gaussian-softmax start); default: the method's own
    (``DEFAULT_SCORES``). ``rollout`` and ``raw_attention`` read attention only and take none.
    """
    score = resolve_score(method, score)
    detr = core(model)
    pixels, (width, height) = prepare(image, **_input_size(model))
    device = next(model.parameters()).device
    text_input, encoding, caption = _encode_text(model, text)
    text_input = {k: v.to(device) for k, v in text_input.items()}
    run = Run(pixels[None].to(device), text_input)

    batch = isinstance(target, Sequence) and not isinstance(target, str)
    targets = list(target) if batch else [target]
    if target is None:
        with torch.no_grad():
            out = model(images=run.pixels, text=run.text)
        targets = [default_targets(model, out, run.num_tokens, query=query, tokens=tokens, phrase=phrase,
                                   caption=caption, encoding=encoding)]
    elif query is not None or tokens is not None or phrase is not None:
        raise InputError("pass either target= or query/tokens/phrase, not both")
    for t in targets:
        if not callable(t) or not hasattr(t, "heads"):
            raise InputTypeError(f"target must be a target object such as QueryTokenTarget, got {t!r}")
        if isinstance(t, AnswerTarget) and getattr(detr, "qa_dataset", None) is None:
            raise InputError("AnswerTarget needs a question-answering model (CLEVR or GQA)")

    was_training = model.training
    model.eval()
    try:
        maps = METHODS[method](model, run, targets, **({} if score is None else {"score": score}))
    finally:
        model.train(was_training)
    ids = run.text["input_ids"][0, : run.num_tokens].cpu()
    strings = _token_strings(model, ids)
    explanations = []
    for t, m in zip(targets, maps):
        full = F.interpolate(m.pixels[None, None].float(), size=(height, width), mode="bilinear",
                             align_corners=False)[0, 0]
        phrase = (tokens_text(encoding, caption, t.tokens)
                  if caption is not None and encoding is not None and getattr(t, "tokens", None) else None)
        explanations.append(Explanation(full.cpu(), m.tokens.cpu(), strings, t, method, caption, m.grid.cpu(),
                                        pixels, m.pixels.cpu(), m.extras, score, phrase or None))
    return explanations if batch else explanations[0]


def resolve_score(method, score=None):
    """The score ``method`` explains: ``score``, or the method's default when None."""
    if method not in METHODS:
        raise UnknownNameError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if DEFAULT_SCORES[method] is None:
        if score is not None:
            raise InputError(f"{method} reads attention only, so no score enters its map: leave score= unset")
        return None
    return DEFAULT_SCORES[method] if score is None else check_score(score)


def _input_size(model):
    """Models trained at another scale than MDETR's 800 px (the toy model) say so."""
    size = getattr(model, "input_size", None)
    return {"size": size} if size else {}
