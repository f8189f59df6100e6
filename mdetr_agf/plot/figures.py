"""Whole figures: an explanation (heatmap, boxes, tokens), the method comparison, QA answers."""
import textwrap

import numpy as np
import torch
from matplotlib.cm import ScalarMappable

from .contrast import contrast_sides, contrast_title, draw_contrast_boxes, is_contrast
from .labels import draw_detections, draw_tokens
from .maps import Scale, _stride, draw_heatmap
from .style import PHRASE_COLOURS, _finish, _new_figure, explanation_title, method_name


def _heat(explanation):
    return explanation.image.numpy() if isinstance(explanation.image, torch.Tensor) else explanation.image


def draw_explanation(ax_image, ax_tokens, explanation, image, title=None, smooth=False, contours=False,
                     colorbar=True, values=False):
    heat, contrasted = _heat(explanation), is_contrast(explanation)
    title = title or (contrast_title(explanation) if contrasted else explanation_title(explanation))
    scale = draw_heatmap(ax_image, image, heat, title=title, smooth=smooth, stride=_stride(explanation, heat.shape[1]),
                         colorbar=colorbar, contours=contours, sides=contrast_sides(explanation) if contrasted else None)
    if ax_tokens is not None:
        draw_tokens(ax_tokens, explanation.token_strings, explanation.tokens.numpy(), values=values,
                    signed=True if contrasted else None)
    return scale


def plot_explanation(explanation, image, save=None, prediction=None, smooth=False, contours=False, values=False,
                     title=None, fig=None):
    """Heatmap over the pixels, with a colorbar and the explained detection's box (when
    ``prediction`` is given), above the caption tokens coloured by their relevance. A contrast
    (``explain(..., versus=)``) is titled "… here, not there", shows both boxes (the other one
    muted) and a signed map whose colorbar names the side each sign favours."""
    fig = fig or _new_figure((6.5, 6.6))
    grid = fig.add_gridspec(2, 1, height_ratios=[6, 1.1 if values else 0.8])
    ax_image, ax_tokens = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    draw_explanation(ax_image, ax_tokens, explanation, image, title, smooth, contours, values=values)
    if is_contrast(explanation):
        draw_contrast_boxes(ax_image, explanation, prediction)
    elif prediction is not None:
        query = getattr(explanation.target, "query", None)
        draw_detections(ax_image, [d for d in prediction.detections if d.query == query], show_masks=False)
    return _finish(fig, save)


def plot_comparison(explanations, image, save=None, row_labels=None, smooth=False, fig=None):
    """A row per target, a column per method (``explanations[row][column]``). Every panel is
    scaled by the same rule on its own values (``Scale``), so no method looks blank because of
    its value distribution; one colorbar per colormap states the rule."""
    rows, cols = len(explanations), len(explanations[0])
    fig = fig or _new_figure((2.6 * cols + 1.2, 2.55 * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False)
    scales = {}
    for r, row in enumerate(explanations):
        for c, expl in enumerate(row):
            heat = _heat(expl)
            scale = draw_heatmap(axes[r, c], image, heat, colorbar=False, smooth=smooth,
                                 stride=_stride(expl, heat.shape[1]),
                                 title=method_name(expl.method) if r == 0 else None)
            scales.setdefault(scale.signed, scale)
        label = row_labels[r] if row_labels else (row[0].phrase or str(row[0].target))
        axes[r, 0].text(-0.06, 0.5, "\n".join(textwrap.wrap(f"“{label}”", 26)), transform=axes[r, 0].transAxes,
                        rotation=90, ha="right", va="center", fontsize=9)
    for signed, scale in sorted(scales.items()):
        unit = Scale(np.array([-1.0, 1.0]) if signed else np.array([0.0, 1.0]), percentile=100.0, signed=signed)
        unit.clip = 1.0
        bar = fig.colorbar(ScalarMappable(unit.norm, unit.cmap), ax=axes, shrink=0.8, pad=0.01, aspect=30,
                           extend="both" if signed else "max")
        bar.set_label(("signed maps" if signed else "non-negative maps") + f": relevance ÷ the panel's clip value\n"
                      f"{scale.rule()}", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return _finish(fig, save)


def plot_answer(scores, save=None, title="answer", top=5, fig=None):
    """A QA answer panel: the top answers and their probabilities, per answer head.

    ``scores``: {head: {answer: probability}}.
    """
    heads = list(scores)
    fig = fig or _new_figure((3.4 * len(heads), 2.6))
    for ax, head in zip(fig.subplots(1, len(heads), squeeze=False)[0], heads):
        items = sorted(scores[head].items(), key=lambda kv: -kv[1])[:top][::-1]
        ax.barh([k for k, _ in items], [v for _, v in items], color=PHRASE_COLOURS[0])
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability", fontsize=8)
        ax.set_title(head, fontsize=10)
    fig.suptitle(title)
    return _finish(fig, save)
