"""The explanation methods for MDETR, one function each, behind ``explain(..., method=)``.

Every method takes the model, one prepared input (``Run``) and a list of targets, runs the
forward once, and returns one ``Maps`` per target: relevance over the input pixels, over the
caption tokens, and over the backbone grid. ``agf`` is the package's subject; the others are
the comparisons users know: ``gae`` (Chefer et al., ICCV 2021), ``rollout`` (Abnar & Zuidema,
2020), ``raw_attention``, ``gradcam`` (Selvaraju et al., 2017) and ``grad_x_input``.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .capture import Capture


@dataclass
class Run:
    pixels: torch.Tensor  # (1, 3, h, w) normalized model input
    text: dict  # input_ids, attention_mask (1, T)

    @property
    def num_tokens(self):
        return int(self.text["attention_mask"][0].sum())


@dataclass
class Maps:
    pixels: torch.Tensor  # (h, w) at the model input's resolution
    tokens: torch.Tensor  # (T,) one value per non-padding token
    grid: torch.Tensor  # (gh, gw) at the backbone grid
    extras: dict = field(default_factory=dict)


def _forward(model, run, pixels):
    return model(images=pixels, text=run.text)


def _grid_to_pixels(grid, size):
    return F.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


# ---------------------------------------------------------------- gradient methods


def grad_x_input(model, run, targets):
    """|x ⊙ ∇x| summed over channels; tokens: word embedding ⊙ its gradient, summed."""
    x = run.pixels.detach().requires_grad_(True)
    results = []
    with torch.enable_grad(), Capture(model) as cap:
        out = _forward(model, run, x)
        for target in targets:
            gx, ge, gs = torch.autograd.grad(target(out), [x, cap.embeddings, cap.src], retain_graph=True)
            tokens = (cap.embeddings * ge).sum(-1)[0, : run.num_tokens]
            grid = (cap.src * gs).sum(1)[0].abs()
            results.append(Maps((x * gx).abs().sum(1)[0].detach(), tokens.detach(), grid.detach()))
    return results


def gradcam(model, run, targets):
    """Grad-CAM on the backbone's last feature map; tokens: the same on the resized text memory."""
    x = run.pixels.detach()
    results = []
    with torch.enable_grad(), Capture(model) as cap:
        out = _forward(model, run, x)
        for target in targets:
            gf, ge = torch.autograd.grad(target(out), [cap.features, cap.embeddings], retain_graph=True)
            weights = gf.mean((2, 3), keepdim=True)
            grid = F.relu((weights * cap.features).sum(1))[0].detach()
            tokens = F.relu((ge.mean(1, keepdim=True) * cap.embeddings).sum(-1))[0, : run.num_tokens]
            results.append(Maps(_grid_to_pixels(grid, x.shape[-2:]), tokens.detach(), grid))
    return results


# ---------------------------------------------------------------- attention methods


def _heads_mean(a):
    return a.mean(1)[0]  # (batch 1, heads, L, S) -> (L, S)


def _split(row, grid_shape, num_tokens, pixels_size):
    """A relevance row over the joint memory [image tokens; text tokens] → (pixels, tokens, grid)."""
    gh, gw = grid_shape
    grid = row[: gh * gw].reshape(gh, gw)
    return _grid_to_pixels(grid, pixels_size), row[gh * gw: gh * gw + num_tokens], grid


def _normalize_residual(r):
    """GAE's normalization of a self-relevance matrix: rows of (R - I) sum to one, then + I."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    off = r - eye
    return off / off.sum(-1, keepdim=True).clamp(min=1e-12) + eye


def gae(model, run, targets):
    """Gradient-weighted attention relevance through the text encoder, the joint encoder and the
    decoder (self- and cross-attention), following Chefer et al.'s rules for bi-modal and
    encoder-decoder transformers."""
    x = run.pixels.detach()
    results = []
    with torch.enable_grad(), Capture(model) as cap:
        out = _forward(model, run, x)
        grid_shape = cap.src.shape[-2:]
        att = cap.attentions
        layers = att["text"] + att["encoder"] + att["decoder_self"] + att["decoder_cross"]
        for target in targets:
            grads = torch.autograd.grad(target(out), layers, retain_graph=True)
            cams = [_heads_mean((a * g).clamp(min=0)).detach() for a, g in zip(layers, grads)]
            cams = dict(zip(("text", "encoder", "decoder_self", "decoder_cross"),
                            _regroup(cams, [len(att[k]) for k in ("text", "encoder", "decoder_self",
                                                                     "decoder_cross")])))
            t = cams["text"][0].shape[-1] if cams["text"] else 0
            r_tt = torch.eye(t, device=x.device)
            for cam in cams["text"]:
                r_tt = r_tt + cam @ r_tt
            n = cams["encoder"][0].shape[-1]
            r_ee = torch.eye(n, device=x.device)
            for cam in cams["encoder"]:
                r_ee = r_ee + cam @ r_ee
            q = cams["decoder_self"][0].shape[-1]
            r_qq, r_qe = torch.eye(q, device=x.device), torch.zeros(q, n, device=x.device)
            for self_cam, cross_cam in zip(cams["decoder_self"], cams["decoder_cross"]):
                r_qq = r_qq + self_cam @ r_qq
                r_qe = r_qe + self_cam @ r_qe
                r_qe = r_qe + _normalize_residual(r_qq).T @ cross_cam @ _normalize_residual(r_ee)
            row = _query_row(target, r_qe, out)
            pixels, tokens, grid = _split(row, grid_shape, run.num_tokens, x.shape[-2:])
            tokens = tokens @ r_tt[: run.num_tokens, : run.num_tokens] if t else tokens
            results.append(Maps(pixels, tokens, grid))
    return results


def _regroup(items, sizes):
    groups, start = [], 0
    for size in sizes:
        groups.append(items[start: start + size])
        start += size
    return groups


def _query_row(target, r_qe, out):
    """The relevance row of the query the target reads (QA targets read their answer slot)."""
    query = getattr(target, "query", None)
    if query is None:  # an answer head: the QA slots follow the detection queries
        slot = ["type", "binary", "reg", "attr"] if "pred_answer_binary" in out else \
            ["type", "obj", "rel", "attr", "cat", "global"]
        query = out["pred_logits"].shape[1] + slot.index(target.head)
    return r_qe[query]


def rollout(model, run, targets):
    """Attention rollout: (A + I)/2 multiplied through the text encoder and the joint encoder,
    read out through the head-averaged last decoder cross-attention of the target's query."""
    x = run.pixels.detach()
    results = []
    with torch.no_grad(), Capture(model) as cap:
        out = _forward(model, run, x)
        grid_shape = cap.src.shape[-2:]

        def roll(maps):
            r = None
            for a in maps:
                a = 0.5 * _heads_mean(a) + 0.5 * torch.eye(a.shape[-1], device=a.device)
                a = a / a.sum(-1, keepdim=True)
                r = a if r is None else a @ r
            return r

        r_ee, r_tt = roll(cap.attentions["encoder"]), roll(cap.attentions["text"])
        cross = _heads_mean(cap.attentions["decoder_cross"][-1])
        for target in targets:
            row = _query_row(target, cross @ r_ee, out)
            pixels, tokens, grid = _split(row, grid_shape, run.num_tokens, x.shape[-2:])
            tokens = tokens @ r_tt[: run.num_tokens, : run.num_tokens]
            results.append(Maps(pixels, tokens, grid))
    return results


def raw_attention(model, run, targets):
    """The last decoder layer's cross-attention of the target's query, averaged over heads."""
    x = run.pixels.detach()
    with torch.no_grad(), Capture(model) as cap:
        out = _forward(model, run, x)
        cross = _heads_mean(cap.attentions["decoder_cross"][-1])
        return [Maps(*_split(_query_row(t, cross, out), cap.src.shape[-2:], run.num_tokens, x.shape[-2:]))
                for t in targets]


def agf(model, run, targets, options=None):
    """AGF: relevance by the rules of the MDETR composite (``mdetr_composite.mdetr_agf``), from the
    target's head through the decoder, the joint encoder and the backbone to the pixels, and
    through the text encoder to the word embeddings.

    ``extras["conservation"]``: the initial relevance (x ⊙ ∇x at the head, ``start``) and the
    shares of it that reach the pixels and the caption tokens; ``absorbed`` is the rest (position,
    type and query embeddings, padding tokens, and what no rule passes on). ``grid`` is the share
    at the projected backbone map (the image side of the joint encoder), for reference.
    """
    from .mdetr_composite import mdetr_agf
    from .mdetr_rules import clear_start, start_total
    from .rules import AGFOptions

    options = options or AGFOptions()
    x = run.pixels.detach().requires_grad_(True)
    groups = {}  # targets that start at the same heads share one composite and one forward
    for i, target in enumerate(targets):
        groups.setdefault(tuple(target.heads(model)), []).append(i)
    results = [None] * len(targets)
    for heads, members in groups.items():
        composite = mdetr_agf(model, list(heads), options)
        with torch.enable_grad(), composite.context(model) as tape, Capture(model) as cap:
            out = _forward(model, run, x)
            inputs = [x, cap.embeddings, cap.src]
            for i in members:
                score = targets[i](out)
                tape.gradient(score, inputs)
                clear_start(tape)
                relevance = tape.relevance(score, inputs, retain=i != members[-1])  # the last frees the forward
                rx, re, rs = (torch.zeros_like(t) if r is None else r for r, t in zip(relevance, inputs))
                pixels, tokens, grid = rx.sum(1)[0], re.sum(-1)[0, : run.num_tokens], rs.sum(1)[0]
                results[i] = Maps(pixels.detach(), tokens.detach(), grid.detach(),
                                  _conservation(start_total(tape), pixels, tokens, grid))
    return results


def _conservation(start, pixels, tokens, grid):
    if start is None:
        return {}
    start = float(start)
    share = {k: float(v.sum()) / start if start else float("nan")
             for k, v in (("pixels", pixels), ("tokens", tokens), ("grid", grid))}
    return {"conservation": {"start": start, "pixels": share["pixels"], "tokens": share["tokens"],
                             "absorbed": 1 - share["pixels"] - share["tokens"], "grid": share["grid"]}}


METHODS = {"agf": agf, "gae": gae, "rollout": rollout, "raw_attention": raw_attention, "gradcam": gradcam,
           "grad_x_input": grad_x_input}
