"""How every figure looks and is saved: constants, names, titles, text colours by contrast."""
import re
import textwrap

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

SEQUENTIAL_CMAP = "inferno"  # perceptually uniform, for non-negative maps
DIVERGING_CMAP = "RdBu_r"  # red: evidence for the target, blue: against
HEATMAP_CMAP = SEQUENTIAL_CMAP
CLIP_PERCENTILE = 99.0  # pixels above the map's 99th percentile of |relevance| saturate the colour scale
OUTLIER_PERCENT = 10.0  # … or, for a map that is zero at 99 % of its pixels, the top 10 % of its mass
DISPLAY_SIDE = 1024  # px: about what a panel shows at SAVE_DPI; bigger images are resized first
SMOOTH_SIGMA = 0.25  # smoothing's Gaussian σ, as a fraction of the backbone stride
SAVE_DPI = 150
MIN_CONTRAST = 4.5  # WCAG AA for normal text
PHRASE_COLOURS = colormaps["tab10"].colors
METHOD_NAMES = {"agf": "AGF", "gae": "GAE", "rollout": "Rollout", "raw_attention": "Raw attention",
                "gradcam": "Grad-CAM", "grad_x_input": "Gradient × input"}
SPECIAL_TOKEN = re.compile(r"^(<[^<>\s]+>|\[(CLS|SEP|PAD|MASK|UNK)\])$")
TOKEN_PAD = 0.3  # token box margin, in units of the font size
DIMMED = ((0.93, 0.93, 0.93), (0.33, 0.33, 0.33))  # special tokens: background, text (contrast 6.6)


def _new_figure(figsize):
    return Figure(figsize=figsize, layout="constrained")


def save(fig, path, dpi=SAVE_DPI):
    """Write ``fig`` to ``path``; the format follows the suffix (.png, .pdf, .svg), PNGs at ``dpi``."""
    fig.savefig(path, dpi=dpi, bbox_inches="tight", pad_inches=0.05)
    return path


def _finish(fig, path):
    if path:
        save(fig, path)
    return fig


def _figure_and_ax(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    fig = _new_figure(figsize)
    return fig, fig.add_subplot()


def _wrap(title, ax, chars_per_inch=13):
    spec = ax.get_subplotspec()
    box = spec.get_position(ax.figure) if spec is not None else ax.get_position()
    width = box.width * ax.figure.bbox.width / ax.figure.dpi
    return "\n".join(textwrap.wrap(title, max(20, int(width * chars_per_inch))))


def method_name(method):
    return METHOD_NAMES.get(method, method)


def explanation_title(explanation):
    """"AGF for “the large red circle”" (the target itself when no phrase is known)."""
    phrase = getattr(explanation, "phrase", None)
    name = method_name(explanation.method)
    return f"{name} for “{phrase}”" if phrase else f"{name}: {explanation.target}"


def luminance(rgb):
    """WCAG relative luminance of an sRGB colour with channels in [0, 1]."""
    c = np.asarray(to_rgb(rgb), dtype=np.float64)
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(c @ [0.2126, 0.7152, 0.0722])


def contrast(a, b):
    """WCAG contrast ratio (1 … 21) between two colours."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def text_colour(background):
    """Black or white, whichever reads better on ``background`` (always ≥ 4.58 : 1)."""
    return "black" if contrast(background, "black") >= contrast(background, "white") else "white"
