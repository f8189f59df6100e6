"""What to explain: small callables on MDETR's output dict (pytorch-grad-cam's model).

A target turns the output dict into one scalar per call (summed over the batch) whose
gradient the methods follow, and names the head(s) where relevance starts, so an AGF
composite knows which Linear begins the propagation. Users compose them; methods never guess.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def gaussian_softmax(logits, index_mask):
    """AGF's starting score: the softmax of the logits weighted by a Gaussian around the target
    logit (width: the largest distance to it), summed over the target positions.

    For several target positions (a phrase of several tokens) the Gaussian is centred on their
    mean logit. ``logits`` (..., K); ``index_mask`` (..., K) with 1 at the target positions.
    """
    centre = (logits * index_mask).sum(-1, keepdim=True) / index_mask.sum(-1, keepdim=True).clamp(min=1)
    sigma = (logits - centre).abs().amax(-1, keepdim=True).clamp(min=1e-9)
    weighted = centre * torch.exp(-0.5 * ((logits - centre) / sigma) ** 2)
    return (F.softmax(weighted, dim=-1) * index_mask).sum()


def core(model):
    """The detector inside a PhraseCut wrapper, or the model itself."""
    return getattr(model, "detr", model)


def _prefix(model):
    return "detr." if hasattr(model, "detr") else ""


@dataclass(frozen=True)
class QueryTokenTarget:
    """Detection query ``query`` grounding caption token positions ``tokens`` (logits over 256 positions)."""

    query: int
    tokens: tuple[int, ...]

    def __call__(self, out):
        logits = out["pred_logits"][:, self.query]
        mask = torch.zeros_like(logits)
        mask[:, list(self.tokens)] = 1
        return gaussian_softmax(logits, mask)

    def heads(self, model):
        return [_prefix(model) + "class_embed"]

    def __str__(self):
        return f"query {self.query}, tokens {list(self.tokens)}"


@dataclass(frozen=True)
class AlignmentTarget:
    """Contrastive alignment of query ``query`` with token positions ``tokens`` (cosine / 0.07)."""

    query: int
    tokens: tuple[int, ...]
    temperature: float = 0.07

    def __call__(self, out):
        q = out["proj_queries"][:, self.query]  # (N, 64)
        t = out["proj_tokens"][:, list(self.tokens)]  # (N, k, 64)
        return (torch.einsum("nd,nkd->nk", q, t) / self.temperature).sum()

    def heads(self, model):
        return ["contrastive_align_projection_image", "contrastive_align_projection_text"]

    def __str__(self):
        return f"alignment of query {self.query} with tokens {list(self.tokens)}"


@dataclass(frozen=True)
class AnswerTarget:
    """A QA head: ``head`` is 'type' or an answer head ('binary', 'attr', 'reg', 'obj', …);
    ``index`` the class to explain (None: the predicted one)."""

    head: str
    index: int | None = None

    def __call__(self, out):
        logits = out[f"pred_answer_{self.head}"]
        if logits.dim() == 1:  # CLEVR's yes/no head: one logit, explain its sigmoid
            return torch.sigmoid(logits).sum() if (self.index or 1) == 1 else torch.sigmoid(-logits).sum()
        index = self.index if self.index is not None else int(logits[0].argmax())
        mask = torch.zeros_like(logits)
        mask[:, index] = 1
        return gaussian_softmax(logits, mask)

    def heads(self, model):
        return [f"answer_{self.head}_head" + (".layers.2" if self.head == "reg" else "")]

    def __str__(self):
        return f"answer head {self.head!r}" + (f", class {self.index}" if self.index is not None else "")


@dataclass(frozen=True)
class MaskTarget:
    """The PhraseCut mask of ``query``: the summed sigmoid of its mask logits."""

    query: int

    def __call__(self, out):
        return out["pred_masks"][:, self.query].sigmoid().sum()

    def heads(self, model):
        return ["mask_head.out_lay"]

    def __str__(self):
        return f"mask of query {self.query}"
