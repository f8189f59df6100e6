"""The explanation methods for MDETR, one function each, behind ``explain(..., method=)``.

Every method takes the model, one prepared input (``Run``) and a list of targets (and, where
a gradient is followed, the target ``score``), runs the forward once, and returns one ``Maps``
per target: relevance over the input pixels, over the caption tokens, and over the backbone grid.
``agf`` is the package's subject; the others are the comparisons users know: ``gae`` (Chefer et
al., ICCV 2021), ``rollout`` (Abnar & Zuidema, 2020, in Chefer et al.'s encoder-decoder form),
``raw_attention``, ``gradcam`` (Selvaraju et al., 2017) and ``grad_x_input``. GAE and rollout
reproduce the outputs of Chefer et al.'s own code; Grad-CAM and gradient × input equal
pytorch-grad-cam's and Captum's (``tests/test_baselines.py``).
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ...errors import InputError
from ...models.mdetr import core
from .capture import ATTENTION_GROUPS, Capture
from .targets import ContrastTarget


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


def grad_x_input(model, run, targets, score="logit"):
    """Gradient × input of the target's score s (Captum's ``InputXGradient``), read at three places:

    pixels: sum over colour channels of |x ⊙ ∂s/∂x| at the normalized model input;
    tokens: sum over the embedding width of E ⊙ ∂s/∂E (signed), E the word embeddings (before
    position embeddings and layer norm); grid: |sum over channels of P ⊙ ∂s/∂P|, P the projected
    backbone map (``input_proj``'s output). ``extras["signed"]``: pixels sum over channels of
    x ⊙ ∂s/∂x and the grid, both without the absolute value: linear in the score, so a contrast's
    sign there says which side a pixel favours.
    """
    x = run.pixels.detach().requires_grad_(True)
    results = []
    with torch.enable_grad(), Capture(model) as cap:
        out = _forward(model, run, x)
        for target in targets:
            gx, ge, gs = torch.autograd.grad(target(out, score), [x, cap.embeddings, cap.src], retain_graph=True)
            tokens = (cap.embeddings * ge).sum(-1)[0, : run.num_tokens]
            grid = (cap.src * gs).sum(1)[0]
            xg = x * gx
            signed = {"pixels": xg.sum(1)[0].detach(), "grid": grid.detach()}
            results.append(Maps(xg.abs().sum(1)[0].detach(), tokens.detach(), grid.abs().detach(),
                                {"signed": signed}))
    return results


def gradcam(model, run, targets, score="logit"):
    """Grad-CAM (pytorch-grad-cam's ``GradCAM`` on the backbone's last layer) of the score s.

    grid: ReLU(sum_c α_c F_c), F the backbone's last feature map and α_c the mean of ∂s/∂F_c over
    the map; pixels: the grid resized bilinearly to the input. tokens: the same construction on the
    word embeddings E (T × D; positions as the map, embedding dimensions as channels):
    ReLU(sum_d ᾱ_d E_td), ᾱ_d the mean of ∂s/∂E_td over all T positions, padding included.
    ``extras["signed"]``: grid and tokens before the ReLU (linear in the score).
    """
    x = run.pixels.detach()
    results = []
    with torch.enable_grad(), Capture(model) as cap:
        out = _forward(model, run, x)
        for target in targets:
            gf, ge = torch.autograd.grad(target(out, score), [cap.features, cap.embeddings], retain_graph=True)
            weights = gf.mean((2, 3), keepdim=True)
            signed_grid = (weights * cap.features).sum(1)[0].detach()
            signed_tokens = (ge.mean(1, keepdim=True) * cap.embeddings).sum(-1)[0, : run.num_tokens].detach()
            grid = F.relu(signed_grid)
            results.append(Maps(_grid_to_pixels(grid, x.shape[-2:]), F.relu(signed_tokens), grid,
                                {"signed": {"grid": signed_grid, "tokens": signed_tokens}}))
    return results


# ---------------------------------------------------------------- attention methods
#
# These read the attention probabilities (after softmax, averaged over heads) of every
# transformer: the text encoder (T × T over all caption positions, padding included), the joint
# encoder (over the joint memory [image tokens in row-major order of the backbone grid; text
# tokens]), and the decoder's self- (Q × Q, every query, QA slots included) and cross-attention
# (Q × joint memory). The target's row of the query-to-memory relevance is split into the grid
# and the caption's real tokens.


def _heads_mean(a):
    return a.mean(1)[0]  # (batch 1, heads, L, S) -> (L, S)


def _split(row, grid_shape, num_tokens, pixels_size):
    """A relevance row over the joint memory [image tokens; text tokens] → (pixels, tokens, grid)."""
    gh, gw = grid_shape
    grid = row[: gh * gw].reshape(gh, gw)
    return _grid_to_pixels(grid, pixels_size), row[gh * gw: gh * gw + num_tokens], grid


def _fold_text(r_tt, size):
    """blockdiag(I_image, R_tt) over the joint memory: the text encoder's relevance enters the text
    block before the joint encoder (Chefer et al.'s bi-modal rule for a single-modality encoder)."""
    r = torch.eye(size, dtype=r_tt.dtype, device=r_tt.device)
    t = r_tt.shape[-1]
    r[size - t:, size - t:] = r_tt
    return r


def _normalize_residual(r):
    """GAE's eqs. 8-9: the rows of R - I scaled to sum to one, then + I.

    An all-zero row of R - I (a padding token, or a query that received no relevance) becomes the
    identity row, the value the equations give once its empty normalized part is taken as 0.
    Chefer et al.'s code divides 0 by 0 there and its NaN patch then drops the layer's whole
    cross-attention term; this is the one intended difference from their code.
    """
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    off = r - eye
    total = off.sum(-1, keepdim=True)
    return off / torch.where(total == 0, torch.ones_like(total), total) + eye


def _self_rule(r, cam):
    return r + cam @ r  # GAE's rules 6-7: R ← R + cam · R


def gae(model, run, targets, score="logit"):
    """Chefer et al.'s generic attention explainability (ICCV 2021), as their DETR
    ``Generator.generate_ours`` computes it, with their bi-modal rule for the text encoder.

    cam = mean over heads of (∂s/∂A ⊙ A).clamp(min=0) for each attention A. Text encoder:
    R_tt = I, R_tt ← R_tt + cam · R_tt per layer. Joint encoder: R_ee = blockdiag(I, R_tt), then
    R_ee ← R_ee + cam · R_ee per layer. Decoder, per layer: R_qq ← R_qq + cam_self · R_qq and
    R_qe ← R_qe + cam_self · R_qe (R_qq = I, R_qe = 0 at the start), then
    R_qe ← R_qe + nrm(R_qq)ᵀ · cam_cross · nrm(R_ee) (``_normalize_residual``, whose empty-row
    guard is the one difference from their code). The map is the target query's row of R_qe; for
    a ``ContrastTarget`` of two queries, the sum of both rows (the score reads both; the cams
    already carry the difference's gradient).
    """
    x = run.pixels.detach()
    results = []
    with torch.enable_grad(), Capture(model) as cap:
        out = _forward(model, run, x)
        grid_shape = cap.src.shape[-2:]
        att = cap.attentions
        sizes = [len(att[k]) for k in ATTENTION_GROUPS]
        layers = [a for k in ATTENTION_GROUPS for a in att[k]]
        for target in targets:
            grads = torch.autograd.grad(target(out, score), layers, retain_graph=True)
            cams = [_heads_mean((a * g).clamp(min=0)).detach() for a, g in zip(layers, grads)]
            text, encoder, dec_self, dec_cross = _regroup(cams, sizes)
            n, q = encoder[0].shape[-1], dec_self[0].shape[-1]
            r_tt = torch.eye(text[0].shape[-1], device=x.device)
            for cam in text:
                r_tt = _self_rule(r_tt, cam)
            r_ee = _fold_text(r_tt, n)
            for cam in encoder:
                r_ee = _self_rule(r_ee, cam)
            r_qq, r_qe = torch.eye(q, device=x.device), torch.zeros(q, n, device=x.device)
            for self_cam, cross_cam in zip(dec_self, dec_cross):
                r_qq, r_qe = _self_rule(r_qq, self_cam), _self_rule(r_qe, self_cam)
                r_qe = r_qe + _normalize_residual(r_qq).T @ cross_cam @ _normalize_residual(r_ee)
            row = sum(r_qe[q] for q in dict.fromkeys(_read_queries(target, model)))
            results.append(Maps(*_split(row, grid_shape, run.num_tokens, x.shape[-2:])))
    return results


def _regroup(items, sizes):
    groups, start = [], 0
    for size in sizes:
        groups.append(items[start: start + size])
        start += size
    return groups


def _slot(target, model):
    """The query the target reads (QA targets read their answer slot)."""
    query = getattr(target, "query", None)
    return core(model).qa_slot(target.head) if query is None else query


def _read_queries(target, model):
    """Every query the target's score reads: both sides of a contrast."""
    if isinstance(target, ContrastTarget):
        return [*_read_queries(target.target, model), *_read_queries(target.versus, model)]
    return [_slot(target, model)]


def _query_row(target, r_qe, model, method):
    """The relevance row of the query the target reads. Attention methods read no score, so a
    contrast between two queries is the difference of their rows; between two phrases of one
    query there is nothing to tell apart, and that is refused."""
    if not isinstance(target, ContrastTarget):
        return r_qe[_slot(target, model)]
    a, b = _slot(target.target, model), _slot(target.versus, model)
    if a == b:
        raise InputError(f"{method} reads attention only, so two phrases of the same query give one map: "
                         f"contrast two queries (versus=<query>) or use a gradient method such as agf")
    return r_qe[a] - r_qe[b]


def _roll(maps):
    """Attention rollout M_L · … · M_1 with M = (Ā + I) / rowsum(Ā + I), Ā the heads' mean."""
    r = None
    for a in maps:
        a = _heads_mean(a) + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        r = a if r is None else a @ r
    return r


def rollout(model, run, targets):
    """Attention rollout (Abnar & Zuidema, 2020) for an encoder-decoder, as Chefer et al.'s DETR
    ``Generator.generate_rollout`` computes it, with the text encoder folded in as for ``gae``:
    R_qe = roll(decoder self)ᵀ · Ā_cross(last decoder layer) · roll(joint encoder) ·
    blockdiag(I, roll(text encoder)). No gradient: the map does not depend on a score; a
    ``ContrastTarget`` of two queries gives the difference of their rows (``_query_row``).
    """
    x = run.pixels.detach()
    results = []
    with torch.no_grad(), Capture(model) as cap:
        _forward(model, run, x)
        att = cap.attentions
        n = att["encoder"][0].shape[-1]
        r_qe = (_roll(att["decoder_self"]).T @ _heads_mean(att["decoder_cross"][-1]) @ _roll(att["encoder"])
                @ _fold_text(_roll(att["text"]), n))
        for target in targets:
            row = _query_row(target, r_qe, model, "rollout")
            results.append(Maps(*_split(row, cap.src.shape[-2:], run.num_tokens, x.shape[-2:])))
    return results


def raw_attention(model, run, targets):
    """The last decoder layer's cross-attention of the target's query, averaged over heads (for a
    contrast of two queries: the difference of their rows, as for ``rollout``)."""
    x = run.pixels.detach()
    with torch.no_grad(), Capture(model) as cap:
        _forward(model, run, x)
        cross = _heads_mean(cap.attentions["decoder_cross"][-1])
        rows = [_query_row(t, cross, model, "raw_attention") for t in targets]
        return [Maps(*_split(row, cap.src.shape[-2:], run.num_tokens, x.shape[-2:])) for row in rows]


def agf(model, run, targets, score="agf", options=None, composite=None):
    """AGF: relevance by the rules of the MDETR composite (``placement.agf_composite``), from the
    target's head through the decoder, the joint encoder and the backbone to the pixels, and
    through the text encoder to the word embeddings.

    ``extras["conservation"]``: the initial relevance (x ⊙ ∇x at the head, ``start``) and the
    shares of it that reach the pixels and the caption tokens; ``absorbed`` is the rest (position,
    type and query embeddings, padding tokens, and what no rule passes on). ``grid`` is the share
    at the projected backbone map (the image side of the joint encoder), for reference.

    A ``ContrastTarget`` is explained as the reference's contrastive LRP starts are: each side is
    its own relevance stream (over the one shared forward), and the map is side a's minus side
    b's; its start is start(a) − start(b) (docs/agf_rules.md, "Contrastive targets").

    ``options``: ``AGFOptions`` for every full AGF rule (the reference's ablations); ``composite``: a
    factory ``(model, heads, options) -> Composite`` in place of ``agf_composite`` (swapped rules).
    """
    sides = []  # each plain target once, in order (by equality: targets need not be hashable)
    for t in _sides(targets):
        if not any(t == seen for seen in sides):
            sides.append(t)
    maps = _agf_streams(model, run, sides, score, options, composite)
    return [_contrast_maps(t, sides, maps) for t in targets]


def _sides(targets):
    for t in targets:
        yield from (_sides([t.target, t.versus]) if isinstance(t, ContrastTarget) else [t])


def _contrast_maps(target, sides, maps):
    """The maps of a plain target, or a contrast's side a minus side b (with the start's difference)."""
    if not isinstance(target, ContrastTarget):
        return maps[next(i for i, side in enumerate(sides) if side == target)]
    a, b = (_contrast_maps(t, sides, maps) for t in (target.target, target.versus))
    pixels, tokens, grid = a.pixels - b.pixels, a.tokens - b.tokens, a.grid - b.grid
    starts = [m.extras.get("conservation", {}).get("start") for m in (a, b)]
    start = None if None in starts else starts[0] - starts[1]
    return Maps(pixels, tokens, grid, _conservation(start, pixels, tokens, grid))


def _agf_streams(model, run, targets, score, options, composite):
    from ..core.rules import AGFOptions
    from .placement import agf_composite
    from .rules import clear_start, start_total

    options = options or AGFOptions()
    make_composite = composite or agf_composite
    x = run.pixels.detach().requires_grad_(True)
    groups = {}  # targets that start at the same heads share one composite and one forward
    for i, target in enumerate(targets):
        groups.setdefault(tuple(target.heads(model)), []).append(i)
    results = [None] * len(targets)
    for heads, members in groups.items():
        rules = make_composite(model, list(heads), options)
        with torch.enable_grad(), rules.context(model) as tape, Capture(model) as cap:
            out = _forward(model, run, x)
            inputs = [x, cap.embeddings, cap.src]
            for i in members:
                value = targets[i](out, score)
                tape.gradient(value, inputs)
                clear_start(tape)
                relevance = tape.relevance(value, inputs, retain=i != members[-1])  # the last frees the forward
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

# Each method's target score as its authors use it (``targets.SCORES``): AGF starts at the
# reference's Gaussian softmax; Chefer et al.'s code explains the raw logit, for Grad-CAM too, and
# so does gradient × input. None: the method reads attention only, so no score enters its map.
DEFAULT_SCORES = {"agf": "agf", "gae": "logit", "rollout": None, "raw_attention": None, "gradcam": "logit",
                  "grad_x_input": "logit"}
