"""Figures for people to look at. Every helper returns a matplotlib Figure (nothing calls
``plt.show()``); ``save=`` writes a PNG or PDF. Plotting never feeds back into the math.

Figures are made without pyplot's global state, so a notebook shows each once (as the cell's
value) and a loop of a hundred explanations does not pile up open figures.
"""
import textwrap

from matplotlib import colormaps
from matplotlib.figure import Figure
import numpy as np
import torch
from matplotlib.patches import Rectangle

from .images import load_image

HEATMAP_CMAP = "inferno"  # perceptually uniform
PHRASE_COLOURS = colormaps["tab10"].colors


def _subplots(rows=1, cols=1, figsize=None, squeeze=True):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, squeeze=squeeze)


def _finish(fig, save):
    fig.tight_layout()
    if save:
        fig.savefig(save, dpi=110, bbox_inches="tight")
    return fig

def as_array(image):
    """H×W×3 float array in [0, 1] from a PIL image, path, URL, array or normalized tensor."""
    if isinstance(image, torch.Tensor):
        from .images import denormalize

        return denormalize(image)
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float64)
        return arr / 255.0 if arr.max() > 1.0 else arr
    return np.asarray(load_image(image), dtype=np.float64) / 255.0

def _phrase_colours(detections):
    colours = {}
    for d in detections:
        colours.setdefault(d.phrase, PHRASE_COLOURS[len(colours) % len(PHRASE_COLOURS)])
    return colours

def draw_detections(ax, detections, show_masks=True):
    colours = _phrase_colours(detections)
    for d in detections:
        colour = colours[d.phrase]
        x0, y0, x1, y1 = d.box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2.5))
        ax.text(x0, y0, f"{d.phrase or '∅'} {d.score:.2f}", color="white", fontsize=9, va="bottom",
                bbox=dict(facecolor=colour, alpha=0.85, pad=1.5, edgecolor="none"))
        if show_masks and d.mask is not None:
            overlay = np.zeros((*d.mask.shape, 4))
            overlay[d.mask] = (*colour[:3], 0.45)
            ax.imshow(overlay)

def plot_detections(prediction, image, save=None, ax=None, title=None):
    """Boxes with their phrase and score (one colour per phrase), masks where the model has them."""
    fig, ax = (ax.figure, ax) if ax is not None else _subplots(figsize=(7, 6))
    ax.imshow(as_array(image))
    draw_detections(ax, prediction.detections)
    caption = prediction.caption + (f"  →  {prediction.answer}" if prediction.answer else "")
    ax.set_title(title or "\n".join(textwrap.wrap(caption, 60)), fontsize=11)
    ax.axis("off")
    return _finish(fig, save)

def overlay_heatmap(image, heatmap, alpha=0.55, cmap=HEATMAP_CMAP, contours=False):
    """RGB array: the image blended with the heatmap's positive part, scaled to [0, 1] and
    colour-mapped (negative relevance, evidence against the target, is not painted)."""
    base = as_array(image)
    heat = np.clip(np.asarray(heatmap, dtype=np.float64), 0, None)
    heat = heat / heat.max() if heat.max() > 0 else heat
    coloured = colormaps[cmap](heat)[..., :3]
    weight = alpha * heat[..., None] ** 0.5  # strong relevance shows, faint relevance leaves the photo visible
    return base * (1 - weight) + coloured * weight

def draw_heatmap(ax, image, heatmap, alpha=0.55, contours=False, title=None):
    ax.imshow(overlay_heatmap(image, heatmap, alpha))
    if contours:
        heat = np.asarray(heatmap, dtype=np.float64)
        if np.ptp(heat) > 0:
            ax.contour(heat, levels=np.quantile(heat, [0.9, 0.97]), colors=["white", "cyan"], linewidths=1)
    if title:
        ax.set_title(title, fontsize=10)
    ax.axis("off")

def plot_heatmap(image, heatmap, save=None, alpha=0.55, contours=False, title=None, ax=None):
    """The image with a heatmap overlay (and optional iso-contours at the top 10% and 3%)."""
    fig, ax = (ax.figure, ax) if ax is not None else _subplots(figsize=(6, 5))
    draw_heatmap(ax, image, heatmap, alpha, contours, title)
    return _finish(fig, save)

def draw_tokens(ax, tokens, relevance, cmap=HEATMAP_CMAP, title=None, per_line=8):
    """Caption tokens as text boxes coloured by their relevance (normalized to the maximum)."""
    rel = np.asarray(relevance, dtype=np.float64)
    scale = np.abs(rel).max() or 1.0
    colours = colormaps[cmap]
    ax.axis("off")
    ax.set_xlim(0, 1)
    lines = max(1, -(-len(tokens) // per_line))
    ax.set_ylim(0, lines)
    for i, (token, value) in enumerate(zip(tokens, rel)):
        line, col = divmod(i, per_line)
        level = max(0.0, value) / scale
        ax.text((col + 0.5) / per_line, lines - line - 0.5, token, ha="center", va="center", fontsize=9,
                color="white" if level > 0.5 else "black",
                bbox=dict(facecolor=colours(0.15 + 0.85 * level), edgecolor="none", pad=2.5))
    if title:
        ax.set_title(title, fontsize=10)

def plot_tokens(tokens, relevance, save=None, title=None, ax=None):
    """Token relevance as coloured caption text."""
    fig, ax = (ax.figure, ax) if ax is not None else _subplots(figsize=(8, 1.4))
    draw_tokens(ax, tokens, relevance, title=title)
    return _finish(fig, save)


def draw_explanation(ax_image, ax_tokens, explanation, image, contours=False, title=None):
    draw_heatmap(ax_image, image, explanation.image.numpy(), contours=contours,
                 title=title or f"{explanation.method}: {explanation.target}")
    if ax_tokens is not None:
        draw_tokens(ax_tokens, explanation.token_strings, explanation.tokens.numpy())


def plot_explanation(explanation, image, save=None, prediction=None, contours=True):
    """Heatmap over the pixels (with the detections, when given) above the token relevance."""
    fig = Figure(figsize=(7, 7))
    grid = fig.add_gridspec(2, 1, height_ratios=[6, 1])
    ax_image, ax_tokens = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    draw_explanation(ax_image, ax_tokens, explanation, image, contours)
    if prediction is not None:
        query = getattr(explanation.target, "query", None)
        draw_detections(ax_image, [d for d in prediction.detections if d.query == query], show_masks=False)
    return _finish(fig, save)


def plot_comparison(explanations, image, save=None, row_labels=None):
    """A row per target, a column per method: ``explanations[row][column]``."""
    rows, cols = len(explanations), len(explanations[0])
    fig, axes = _subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for r, row in enumerate(explanations):
        for c, expl in enumerate(row):
            draw_heatmap(axes[r, c], image, expl.image.numpy(), title=expl.method if r == 0 else None)
        label = row_labels[r] if row_labels else str(row[0].target)
        axes[r, 0].text(-0.04, 0.5, label, transform=axes[r, 0].transAxes, rotation=90, ha="right",
                        va="center", fontsize=9)
    return _finish(fig, save)


def plot_components(components, save=None, image=None):
    """AGF's pieces at one layer, as in the paper's method figure: C, M, F_x, F_∇x, A and the result.

    ``components``: {name: (h, w) array}; missing pieces are skipped.
    """
    names = [n for n in ("C", "M", "F_x", "F_dx", "A", "result") if n in components]
    labels = {"F_dx": "F_∇x"}
    fig, axes = _subplots(1, len(names) + (image is not None), figsize=(2.6 * (len(names) + 1), 2.8),
                             squeeze=False)
    axes = list(axes[0])
    if image is not None:
        axes.pop(0).imshow(as_array(image))
    for ax, name in zip(axes, names):
        value = np.asarray(components[name], dtype=np.float64)
        ax.imshow(value, cmap="RdBu_r" if value.min() < 0 else HEATMAP_CMAP,
                  vmin=-np.abs(value).max() if value.min() < 0 else None,
                  vmax=np.abs(value).max() if value.min() < 0 else None)
        ax.set_title(labels.get(name, name), fontsize=11)
    for ax in fig.axes:
        ax.axis("off")
    return _finish(fig, save)


def plot_answer(scores, save=None, title="answer", top=5):
    """A QA answer panel: the top answers and their probabilities, per answer head.

    ``scores``: {head: {answer: probability}}.
    """
    heads = list(scores)
    fig, axes = _subplots(1, len(heads), figsize=(3.4 * len(heads), 2.6), squeeze=False)
    for ax, head in zip(axes[0], heads):
        items = sorted(scores[head].items(), key=lambda kv: -kv[1])[:top][::-1]
        ax.barh([k for k, _ in items], [v for _, v in items], color=PHRASE_COLOURS[0])
        ax.set_xlim(0, 1)
        ax.set_title(head, fontsize=10)
    fig.suptitle(title)
    return _finish(fig, save)
