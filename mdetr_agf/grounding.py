"""Which query grounds which caption tokens: the one rule ``predict``, ``explain``, ``evaluate``
and the figures share.

MDETR's post-processing: a query grounds the caption tokens its softmax over the 256 token
positions gives more than ``TOKEN_THRESHOLD``; its score is the probability of *not* being
"no object" (the last position). A phrase is drawn and explained by one query, the most
confident of those grounding any of its tokens.
"""
import torch

TOKEN_THRESHOLD = 0.1


def object_scores(logits):
    """(Q,) probability that each query is an object: 1 − softmax mass on "no object"."""
    return 1 - logits.softmax(-1)[..., -1]


def grounded_tokens(logits_row, num_tokens):
    """Token positions (of the ``num_tokens`` real ones) one query's logits ground."""
    probs = logits_row.softmax(-1)[:num_tokens]
    return [int(t) for t in torch.nonzero(probs > TOKEN_THRESHOLD).flatten()]


def best_query(candidates, tokens):
    """The query that stands for a phrase (``tokens``: its caption positions), so that each object
    a caption names is drawn and explained once: of the ``candidates`` — ``(query, score,
    grounded tokens)`` — that ground any of these tokens, the most confident; None when none does."""
    wanted = set(tokens)
    grounding = [(score, query) for query, score, grounds in candidates if wanted & set(grounds)]
    return max(grounding)[1] if grounding else None


def most_mass_query(logits, tokens):
    """The query of one caption's ``logits`` (Q × 256) whose softmax puts the most mass on
    ``tokens``, whether or not it passes ``TOKEN_THRESHOLD``."""
    return int(logits.softmax(-1)[:, list(tokens)].sum(-1).argmax())


def query_for_tokens(logits, tokens, num_tokens):
    """``best_query`` over every query of one caption's ``logits`` (Q × 256); when no query grounds
    the tokens, ``most_mass_query``."""
    scores = object_scores(logits)
    candidates = [(q, float(scores[q]), grounded_tokens(logits[q], num_tokens)) for q in range(logits.shape[0])]
    query = best_query(candidates, tokens)
    return query if query is not None else most_mass_query(logits, tokens)


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
