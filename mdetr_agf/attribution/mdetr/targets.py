"""What to explain: small callables on MDETR's output dict (pytorch-grad-cam's model).

A target turns the output dict into one scalar per call (summed over the batch) whose
gradient the methods follow, and names the head(s) where relevance starts, so an AGF
composite knows which Linear begins the propagation. Users compose them; methods never guess.

Which scalar is a stated choice, ``score``, because it changes the maps: ``target(out, score)``
with one of ``SCORES``. Each method has its authors' default (``methods.DEFAULT_SCORES``).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...errors import UnknownNameError
from ...models.mdetr import core, module_prefix

SCORES = {
    "logit": "the raw logit, summed over the target positions (Chefer et al.'s DETR target)",
    "softmax": "the softmax probability mass on the target positions (what predict thresholds)",
    "agf": "AGF's start: the Gaussian-weighted softmax at the target positions (the reference's)",
}


def check_score(score):
    if score not in SCORES:
        raise UnknownNameError(f"unknown score {score!r}: choose one of {', '.join(SCORES)}")
    return score


def gaussian_softmax(logits, index_mask, valid=None):
    """AGF's starting score: the softmax of the logits weighted by a Gaussian around the target
    logit (width: the largest distance to it), summed over the target positions.

    For several target positions (a phrase of several tokens) the Gaussian is centred on their
    mean logit. ``logits`` (..., K); ``index_mask`` (..., K) with 1 at the target positions;
    ``valid`` (..., K) bool, the positions that exist (default: all).
    """
    centre = (logits * index_mask).sum(-1, keepdim=True) / index_mask.sum(-1, keepdim=True).clamp(min=1)
    distance = (logits - centre).abs()
    if valid is not None:
        distance = distance.masked_fill(~valid, 0)
    sigma = distance.amax(-1, keepdim=True).clamp(min=1e-9)
    weighted = centre * torch.exp(-0.5 * ((logits - centre) / sigma) ** 2)
    if valid is not None:
        weighted = weighted.masked_fill(~valid, float("-inf"))
    return (F.softmax(weighted, dim=-1) * index_mask).sum()


def class_score(logits, index_mask, score, valid=None):
    """``score`` of the target positions ``index_mask`` (..., K) of ``logits`` (..., K) over the
    positions ``valid`` (default: all), summed over the batch."""
    if check_score(score) == "logit":
        return (logits * index_mask).sum()
    if score == "softmax":
        masked = logits if valid is None else logits.masked_fill(~valid, float("-inf"))
        return (F.softmax(masked, dim=-1) * index_mask).sum()
    return gaussian_softmax(logits, index_mask, valid)


@dataclass(frozen=True)
class QueryTokenTarget:
    """Detection query ``query`` grounding caption token positions ``tokens``: its class logits
    over all 256 positions (the last one: no object), as ``predict`` reads them."""

    query: int
    tokens: tuple[int, ...]

    def __call__(self, out, score="agf"):
        logits = out["pred_logits"][:, self.query]
        mask = torch.zeros_like(logits)
        mask[:, list(self.tokens)] = 1
        return class_score(logits, mask, score)

    def heads(self, model):
        return [module_prefix(model) + "class_embed"]

    def __str__(self):
        return f"query {self.query}, tokens {list(self.tokens)}"


@dataclass(frozen=True)
class AlignmentTarget:
    """Contrastive alignment of query ``query`` with token positions ``tokens``: the logits are
    cosine / 0.07 against every caption token; softmax and AGF's start run over the caption's
    real tokens, as MDETR's contrastive loss normalizes over them."""

    query: int
    tokens: tuple[int, ...]
    temperature: float = 0.07

    def __call__(self, out, score="agf"):
        q = out["proj_queries"][:, self.query]  # (N, 64)
        logits = torch.einsum("nd,ntd->nt", q, out["proj_tokens"]) / self.temperature  # (N, T)
        mask = torch.zeros_like(logits)
        mask[:, list(self.tokens)] = 1
        valid = out["attention_mask"].to(logits.device).bool() if "attention_mask" in out else None
        return class_score(logits, mask, score, valid)

    def heads(self, model):
        return ["contrastive_align_projection_image", "contrastive_align_projection_text"]

    def __str__(self):
        return f"alignment of query {self.query} with tokens {list(self.tokens)}"


@dataclass(frozen=True)
class AnswerTarget:
    """A QA head: ``head`` is 'type' or an answer head ('binary', 'attr', 'reg', 'obj', …);
    ``index`` the class to explain (None: the predicted one). CLEVR's yes/no head has one logit
    and no softmax: ``"logit"`` is that logit (negated for "no"), ``"softmax"`` and ``"agf"`` its
    sigmoid."""

    head: str
    index: int | None = None

    def __call__(self, out, score="agf"):
        logits = out[f"pred_answer_{self.head}"]
        if logits.dim() == 1:  # CLEVR's yes/no head
            signed = logits if (self.index or 1) == 1 else -logits
            return signed.sum() if check_score(score) == "logit" else torch.sigmoid(signed).sum()
        index = self.index if self.index is not None else int(logits[0].argmax())
        mask = torch.zeros_like(logits)
        mask[:, index] = 1
        return class_score(logits, mask, score)

    def heads(self, model):
        return [core(model).qa_output_layer(self.head)]

    def __str__(self):
        return f"answer head {self.head!r}" + (f", class {self.index}" if self.index is not None else "")


@dataclass(frozen=True)
class MaskTarget:
    """The PhraseCut mask of ``query``. Each pixel is its own yes/no: ``"logit"`` sums the mask
    logits, ``"softmax"`` and ``"agf"`` their sigmoids (there is no softmax across pixels)."""

    query: int

    def __call__(self, out, score="agf"):
        logits = out["pred_masks"][:, self.query]
        return logits.sum() if check_score(score) == "logit" else logits.sigmoid().sum()

    def heads(self, model):
        return ["mask_head.out_lay"]

    def __str__(self):
        return f"mask of query {self.query}"


@dataclass(frozen=True)
class ContrastTarget:
    """Why ``target`` and not ``versus``: the score is target's score minus versus's score on the
    same forward, so a gradient method follows the gradient of the difference and AGF starts from
    x ⊙ ∇(s_target − s_versus) at the heads of both (docs/agf_rules.md, "Contrastive targets").
    Each side's score is the method's stated choice (``score``), then differenced. ``query`` and
    ``tokens`` are the target's: the box and the phrase the explanation is about."""

    target: object
    versus: object

    def __call__(self, out, score="agf"):
        return self.target(out, score) - self.versus(out, score)

    def heads(self, model):
        return list(dict.fromkeys([*self.target.heads(model), *self.versus.heads(model)]))

    @property
    def query(self):
        return getattr(self.target, "query", None)

    @property
    def tokens(self):
        return getattr(self.target, "tokens", None)

    def __str__(self):
        return f"{self.target}, not {self.versus}"
