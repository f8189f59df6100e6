"""``explain``: one door to every method, with the inputs ``predict`` takes.

It prepares the image and caption exactly as prediction does (``inputs.model_input``), picks a
target when none is given (the best detection, or the phrase / tokens / query the user named),
validates every choice with an error that says what is allowed, and returns an ``Explanation`` whose image
map has the original image's resolution.
"""
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import text as text_utils
from .errors import InputError, InputTypeError, UnknownNameError
from .locking import one_at_a_time
from .grounding import grounded_tokens, object_scores, query_for_tokens
from .inputs import caption_positions, encode_caption, model_input
from .prediction import box_cxcywh_to_xyxy, tokens_text
from .attribution.core.borrow import borrowed
from .attribution.core.rules import AGFOptions
from .attribution.mdetr.methods import DEFAULT_SCORES, METHODS, Run
from .attribution.mdetr.targets import AnswerTarget, ContrastTarget, QueryTokenTarget, check_score
from .models.mdetr import core


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
    versus: int | str | None = None  # a contrast's other side: its query (an int) or its phrase (a str)
    boxes: dict | None = None  # a contrast's {query: predicted box, xyxy pixels of the original image}, both sides


def _encode_text(model, text):
    """(model text input, encoding with offsets or None, caption or None)."""
    if isinstance(text, str):
        encoding = encode_caption(core(model), text)
        return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}, encoding, text
    if isinstance(text, Mapping) and "input_ids" in text:
        ids, mask = _check_token_ids(model, text["input_ids"], text.get("attention_mask"))
        return {"input_ids": ids, "attention_mask": mask}, text if "offset_mapping" in text else None, None
    raise InputTypeError(f"text must be a caption string or a mapping with input_ids, not {type(text).__name__}")


def _integer_tensor(value, name):
    tensor = torch.as_tensor(value)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise InputTypeError(f"{name} must hold integers (torch.long), got dtype {tensor.dtype}; "
                             f"tokenize the caption with the model's tokenizer (model.get_tokenizer())")
    return tensor.long()


def _check_token_ids(model, ids, mask):
    """Token ids (and mask) a user passes in place of a caption: one row, in the model's vocabulary,
    no longer than its token positions, with at least one token to read."""
    ids = _integer_tensor(ids, "input_ids")
    ids = ids[None] if ids.dim() == 1 else ids
    mask = torch.ones_like(ids) if mask is None else _integer_tensor(mask, "attention_mask")
    mask = mask[None] if mask.dim() == 1 else mask
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape != mask.shape:
        raise InputError(f"explain takes one caption: input_ids and attention_mask of shape (1, T), got "
                         f"{tuple(ids.shape)} and {tuple(mask.shape)}")
    vocabulary = core(model).transformer.text_encoder.embeddings.word_embeddings.num_embeddings
    bad = ids[(ids < 0) | (ids >= vocabulary)]
    if bad.numel():
        raise InputError(f"input_ids hold {int(bad[0])}, outside the model's vocabulary of ids 0 … {vocabulary - 1}; "
                         f"tokenize the caption with the model's tokenizer (model.get_tokenizer())")
    if ((mask != 0) & (mask != 1)).any():
        raise InputError("attention_mask must hold only 0 (padding) and 1 (a caption token)")
    if not mask.any():
        raise InputError("attention_mask is all zeros: no caption token to explain; mark the caption's "
                         "tokens with 1")
    limit = caption_positions(model)
    if int(mask.sum()) > limit:
        raise InputError(f"the caption is {int(mask.sum())} tokens long; the model covers at most {limit} "
                         f"token positions; shorten it")
    return ids, mask


def _token_strings(model, ids):
    tokenizer = core(model).tokenizer
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [t.replace("Ġ", " ").strip() or t for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def _as_int(value):
    """Python, numpy and 0-d tensor integers as an int; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        return int(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _check_index(value, upper, what):
    value = _as_int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{what} must be an int, got {type(value).__name__}")
    if not 0 <= value < upper:
        raise UnknownNameError(f"{what} {value} is out of range: allowed 0 … {upper - 1}")
    return value


def _token_list(tokens):
    tokens = _as_int(tokens)
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        return [tokens]
    if isinstance(tokens, (torch.Tensor, np.ndarray)):
        return tokens.tolist() if tokens.ndim == 1 else [tokens]  # other ranks: refused as not an int
    if isinstance(tokens, Iterable) and not isinstance(tokens, (str, bytes)):
        return list(tokens)
    raise InputTypeError(f"tokens must be a token position (an int) or a list of them, got "
                         f"{type(tokens).__name__} {tokens!r:.60}")


def default_targets(model, out, num_tokens, *, query, tokens, phrase, caption, encoding):
    """Resolve the user's query / tokens / phrase into a target (see ``explain``)."""
    num_queries = out["pred_logits"].shape[1]
    if phrase is not None:
        tokens = _phrase_tokens(encoding, caption, phrase, "phrase=")
    if tokens is not None:
        tokens = _token_list(tokens)
        if not tokens:
            raise InputError("tokens= is empty: name at least one token position")
        for t in tokens:
            _check_index(t, num_tokens, "token position")
    if query is None:
        if tokens is not None:  # the box drawn for these tokens (one per phrase)
            query = query_for_tokens(out["pred_logits"][0], tokens, num_tokens)
        else:
            query = int(object_scores(out["pred_logits"][0]).argmax())
    query = _check_index(query, num_queries, "query")
    if tokens is None:
        tokens = (grounded_tokens(out["pred_logits"][0, query], num_tokens)
                  or [int(out["pred_logits"][0, query].softmax(-1)[:num_tokens].argmax())])
    return QueryTokenTarget(query, tuple(tokens))


def _phrase_tokens(encoding, caption, phrase, option):
    """The caption's token positions of ``phrase``; ``option`` names the argument in the error."""
    if encoding is None or caption is None:
        raise InputError(f"{option} needs the caption as a string (token ids carry no text)")
    return text_utils.phrase_tokens(encoding, caption, phrase)


def contrast_target(target, versus, out, num_tokens, *, caption, encoding):
    """``target`` against ``versus``: a query index (the same tokens grounded by another box) or a
    phrase of the caption (the same box grounding another phrase's tokens)."""
    versus = _as_int(versus)
    if isinstance(versus, str):
        other = QueryTokenTarget(target.query, tuple(_phrase_tokens(encoding, caption, versus, "versus=<phrase>")))
        if set(other.tokens) == set(target.tokens):
            raise InputError(f"versus={versus!r} covers the same tokens as the explained phrase: name another "
                             f"phrase of the caption, or another query (an int)")
    elif isinstance(versus, int) and not isinstance(versus, bool):
        query = _check_index(versus, out["pred_logits"].shape[1], "versus query")
        if query == target.query:
            raise InputError(f"versus={query} is the explained query itself: name another query "
                             f"(0 … {out['pred_logits'].shape[1] - 1}) or a phrase of the caption")
        other = QueryTokenTarget(query, target.tokens)
    else:
        raise InputTypeError(f"versus must be a query (an int) or a phrase of the caption (a str), got "
                             f"{type(versus).__name__} {versus!r:.60}")
    return ContrastTarget(target, other)


def explain(model, image, text, *, query=None, tokens=None, phrase=None, target=None, versus=None, method="agf",
            score=None, composite=None, options=None):
    """Explain one grounding (or a list of targets) of ``text`` in ``image``.

    ``query``: a detection slot (default: the most confident); ``tokens``: caption token positions
    (default: those the query grounds); ``phrase``: a phrase of the caption, in place of tokens;
    ``target``: a target object (``QueryTokenTarget``, ``AlignmentTarget``, ``AnswerTarget``,
    ``MaskTarget``) or a list of them, which returns a list of explanations from one call (AGF makes
    one pass per distinct set of output heads the targets start from).
    ``versus``: why this box for the phrase *and not another*: a query (an int; the same tokens
    grounded by that box) or a phrase of the caption (a str; the same box grounding that phrase's
    tokens). The target becomes a ``ContrastTarget`` (score: the difference of the two sides'
    scores) and the map is signed: positive for the explained side, negative for ``versus``.
    ``method``: one of ``METHODS``. ``score``: the target's scalar whose gradient is explained,
    ``"logit"`` (the raw logit summed over the phrase's tokens), ``"softmax"`` (the probability
    mass on them) or ``"agf"`` (AGF's Gaussian-softmax start); default: the method's own
    (``DEFAULT_SCORES``). ``rollout`` and ``raw_attention`` read attention only and take none.
    ``composite`` (AGF only): a factory ``(model, heads, options) -> Composite`` in place of
    ``agf_composite``, e.g. ``functools.partial(agf_composite, name_rules={...})`` to swap rules;
    ``options`` (AGF only): ``AGFOptions`` (the reference's ablations).

    The model is given back exactly as found (``borrow``): frozen, half-precision models and calls
    inside ``torch.inference_mode()`` explain too. One call at a time per model: calls from other
    threads wait (``mdetr_agf.locking``).
    """
    score = resolve_score(method, score)
    settings = {} if score is None else {"score": score}
    settings.update(_agf_settings(method, composite, options))
    with one_at_a_time(model, "explain"), borrowed(model):
        return _explain(model, image, text, dict(query=query, tokens=tokens, phrase=phrase), versus,
                        target, method, settings)


def _agf_settings(method, composite, options):
    """``composite=`` / ``options=`` checked: they configure AGF's rules, so other methods refuse them."""
    settings = {k: v for k, v in (("composite", composite), ("options", options)) if v is not None}
    if settings and method != "agf":
        raise InputError(f"{' and '.join(f'{k}=' for k in settings)} configure AGF's rules; {method} has none: "
                         f"leave them unset or use method='agf'")
    if composite is not None and not callable(composite):
        raise InputTypeError(f"composite must be a factory (model, heads, options) -> Composite, such as "
                             f"agf_composite; got {type(composite).__name__}")
    if options is not None and not isinstance(options, AGFOptions):
        raise InputTypeError(f"options must be an AGFOptions, got {type(options).__name__}")
    return settings


def _explain(model, image, text, choice, versus, target, method, settings):
    detr = core(model)
    pixels, (width, height) = model_input(model, image)
    if pixels.is_inference():  # a tensor made under torch.inference_mode(): autograd needs a normal copy
        pixels = pixels.clone()
    device = pixels.device
    text_input, encoding, caption = _encode_text(model, text)
    text_input = {k: v.to(device) for k, v in text_input.items()}
    run = Run(pixels[None], text_input)

    batch = isinstance(target, Sequence) and not isinstance(target, str)
    targets = list(target) if batch else [target]
    out = None
    if target is None:
        with torch.no_grad():
            out = model(images=run.pixels, text=run.text)
        targets = [default_targets(model, out, run.num_tokens, caption=caption, encoding=encoding, **choice)]
        if versus is not None:
            targets = [contrast_target(targets[0], versus, out, run.num_tokens, caption=caption, encoding=encoding)]
    elif versus is not None:
        raise InputError("versus= contrasts the target explain picks from query/tokens/phrase; with target= "
                         "pass ContrastTarget(target, other) instead")
    elif any(v is not None for v in choice.values()):
        raise InputError("pass either target= or query/tokens/phrase, not both")
    for t in targets:
        if not callable(t) or not hasattr(t, "heads"):
            raise InputTypeError(f"target must be a target object such as QueryTokenTarget, got {t!r}")
        if isinstance(t, AnswerTarget) and getattr(detr, "qa_dataset", None) is None:
            raise InputError("AnswerTarget needs a question-answering model (CLEVR or GQA)")

    boxes = [None] * len(targets)
    if any(isinstance(t, ContrastTarget) for t in targets):  # the figure draws both boxes
        if out is None:
            with torch.no_grad():
                out = model(images=run.pixels, text=run.text)
        predicted = box_cxcywh_to_xyxy(out["pred_boxes"][0].float().cpu(), width, height)
        boxes = [{q: tuple(predicted[q].tolist()) for q in (t.query, getattr(t.versus, "query", None))
                  if q is not None and q < len(predicted)} if isinstance(t, ContrastTarget) else None
                 for t in targets]
    maps = METHODS[method](model, run, targets, **settings)
    ids = run.text["input_ids"][0, : run.num_tokens].cpu()
    strings = _token_strings(model, ids)
    explanations = []
    for t, m, b in zip(targets, maps, boxes):
        full = F.interpolate(m.pixels[None, None].float(), size=(height, width), mode="bilinear",
                             align_corners=False)[0, 0]
        explanations.append(Explanation(full.cpu(), m.tokens.float().cpu(), strings, t, method, caption,
                                        m.grid.float().cpu(), pixels.float().cpu(), m.pixels.float().cpu(),
                                        m.extras, settings.get("score"), _phrase_text(t, encoding, caption) or None,
                                        _versus(t, encoding, caption), b))
    return explanations if batch else explanations[0]


def _versus(target, encoding, caption):
    """What a figure names as a contrast's other side: its phrase when the box is the same, else its query."""
    if not isinstance(target, ContrastTarget):
        return None
    other = target.versus
    if getattr(other, "query", None) == target.query and (phrase := _phrase_text(other, encoding, caption)) is not None:
        return phrase
    return getattr(other, "query", None)


def _phrase_text(target, encoding, caption):
    """The caption's text under a target's tokens; None without a caption string or tokens."""
    if caption is None or encoding is None or not getattr(target, "tokens", None):
        return None
    return tokens_text(encoding, caption, target.tokens)


def resolve_score(method, score=None):
    """The score ``method`` explains: ``score``, or the method's default when None."""
    if not isinstance(method, str):
        raise InputTypeError(f"method must be a name (str), one of {', '.join(METHODS)}; got "
                             f"{type(method).__name__} {method!r:.60}")
    if method not in METHODS:
        raise UnknownNameError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if DEFAULT_SCORES[method] is None:
        if score is not None:
            raise InputError(f"{method} reads attention only, so no score enters its map: leave score= unset")
        return None
    return DEFAULT_SCORES[method] if score is None else check_score(score)
