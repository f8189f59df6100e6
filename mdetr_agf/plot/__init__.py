"""Figures for people to look at. Every ``plot_*`` function takes an optional ``ax`` (one-panel
plots) or ``fig`` (a Figure or SubFigure, for several panels), or makes its own, returns the Figure, and never touches pyplot's global state, so a notebook
shows each figure once and a loop of a hundred explanations does not pile up open figures.
``save(fig, path)`` writes PNG, PDF or SVG at ``SAVE_DPI``. Plotting never feeds back into the math.

How a relevance map is shown, and why:
- **Robust scale.** Explanation maps are spiky (an AGF map's 99th percentile can be a tenth of
  its maximum, its 90th zero), so scaling to the maximum shows almost nothing. The colour scale
  is clipped at the map's ``CLIP_PERCENTILE``-th percentile of |relevance| (the top 1 % of pixels
  saturate; a map that is zero almost everywhere is clipped where the top ``OUTLIER_PERCENT`` %
  of its relevance mass begins, Captum's outlier rule), and the colorbar says so.
- **Sign.** A map with negative relevance (evidence against the target, as AGF gives) is drawn
  with a diverging colormap, red for and blue against, symmetric around zero; a non-negative
  map with a sequential one.
- **Smoothing** at the backbone's stride is optional (``smooth=True``) and stated when on.
- Images are shown at display resolution (long side ≤ ``DISPLAY_SIDE``): a 12-megapixel photo
  renders as fast as a small one, and boxes stay in the original image's pixel coordinates.
- Text labels (tokens, box labels) are placed at draw time from their measured extents, so they
  never overlap each other or leave their axes, whatever the figure's final size or DPI.
"""
from .contrast import CONTRAST_COLOURS, contrast_title, is_contrast
from .figures import draw_explanation, plot_answer, plot_comparison, plot_explanation
from .labels import (_extent, _overlaps, draw_detections, draw_tokens, is_special, phrase_colours, plot_detections,
                     plot_tokens)
from .maps import (Scale, as_array, clip_value, display_map, draw_heatmap, muted, overlay_heatmap, plot_heatmap)
from .style import (CLIP_PERCENTILE, DIMMED, DISPLAY_SIDE, DIVERGING_CMAP, HEATMAP_CMAP, METHOD_NAMES, MIN_CONTRAST,
                    OUTLIER_PERCENT, PHRASE_COLOURS, SAVE_DPI, SEQUENTIAL_CMAP, SMOOTH_SIGMA, SPECIAL_TOKEN, TOKEN_PAD,
                    contrast, explanation_title, luminance, method_name, save, text_colour)

__all__ = [
    "CONTRAST_COLOURS", "contrast_title", "is_contrast",
    "draw_explanation", "plot_answer", "plot_comparison", "plot_explanation", "_extent", "_overlaps",
    "draw_detections", "draw_tokens", "is_special", "phrase_colours", "plot_detections", "plot_tokens", "Scale",
    "as_array", "clip_value", "display_map", "draw_heatmap", "muted", "overlay_heatmap", "plot_heatmap",
    "CLIP_PERCENTILE", "DIMMED", "DISPLAY_SIDE", "DIVERGING_CMAP", "HEATMAP_CMAP", "METHOD_NAMES", "MIN_CONTRAST",
    "OUTLIER_PERCENT", "PHRASE_COLOURS", "SAVE_DPI", "SEQUENTIAL_CMAP", "SMOOTH_SIGMA", "SPECIAL_TOKEN",
    "TOKEN_PAD", "contrast", "explanation_title", "luminance", "method_name", "save", "text_colour",
]
