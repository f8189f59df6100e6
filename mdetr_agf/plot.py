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
import re
import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize, to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from PIL import Image

from .images import load_image

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


# ---------------------------------------------------------------- figures and saving


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


def method_name(method):
    return METHOD_NAMES.get(method, method)


def explanation_title(explanation):
    """"AGF for “the large red circle”" (the target itself when no phrase is known)."""
    phrase = getattr(explanation, "phrase", None)
    name = method_name(explanation.method)
    return f"{name} for “{phrase}”" if phrase else f"{name}: {explanation.target}"


# ---------------------------------------------------------------- colour and contrast


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


# ---------------------------------------------------------------- images and maps at display size


def _display_shape(height, width, side=DISPLAY_SIDE):
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def as_array(image, side=None):
    """H×W×3 float array in [0, 1] from a PIL image, path, URL, array or normalized tensor,
    resized so its long side is at most ``side`` pixels (None: as it is)."""
    if isinstance(image, torch.Tensor):
        from .images import denormalize

        image = denormalize(image)
    if isinstance(image, np.ndarray):
        arr = image.astype(np.float32)
        arr = arr / 255.0 if arr.max() > 1.0 else arr
        if side and max(arr.shape[:2]) > side:
            arr = _resize(arr.transpose(2, 0, 1), _display_shape(*arr.shape[:2], side)).transpose(1, 2, 0)
        return arr
    pil = load_image(image)
    if side and max(pil.size) > side:
        h, w = _display_shape(pil.height, pil.width, side)
        pil = pil.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(pil, dtype=np.float32) / 255.0


def _resize(array, shape):
    """(C×)H×W float array resized to ``shape`` with anti-aliasing (area-like when shrinking)."""
    t = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)
    t = t[None, None] if t.dim() == 2 else t[None]
    out = F.interpolate(t, size=tuple(shape), mode="bilinear", antialias=True, align_corners=False)[0]
    return out[0].numpy() if array.ndim == 2 else out.numpy()


def clip_value(values, outlier=OUTLIER_PERCENT):
    """The smallest value v such that the entries of ``values`` above v hold at most
    ``outlier`` % of their total (Captum's outlier rule; also the contour levels)."""
    flat = np.sort(np.asarray(values, dtype=np.float64).ravel())
    total = flat.sum()
    if total <= 0:
        return 0.0
    cumulative = np.cumsum(flat)
    index = np.searchsorted(cumulative, total * (1 - outlier / 100.0))
    return float(flat[min(index, flat.size - 1)])


class Scale:
    """How one map is coloured: the clip value, whether signed, the colormap, and its description."""

    def __init__(self, heat, percentile=CLIP_PERCENTILE, signed=None, smoothed=None):
        heat = np.asarray(heat, dtype=np.float64)
        absolute = np.abs(heat)
        # signed: a map whose negative part is more than float noise (1 % of its mass)
        self.signed = bool(np.clip(-heat, 0, None).sum() > 0.01 * absolute.sum()) if signed is None else signed
        values = absolute if self.signed else np.clip(heat, 0, None)
        self.clip = float(np.percentile(values, percentile)) if values.size else 0.0
        self.rule_text = f"values above the {percentile:g}th percentile saturate"
        if self.clip <= 0:  # zero at nearly every pixel: clip by mass instead
            self.clip = clip_value(values, OUTLIER_PERCENT)
            self.rule_text = f"the top {OUTLIER_PERCENT:g} % of the mass saturates"
        self.clip = self.clip or 1.0
        self.cmap = colormaps[DIVERGING_CMAP if self.signed else SEQUENTIAL_CMAP]
        self.smoothed = smoothed

    @property
    def norm(self):
        return Normalize(-self.clip if self.signed else 0.0, self.clip)

    def levels(self, heat):
        """Map values scaled to [-1, 1] (signed) or [0, 1], clipped at the scale's top."""
        heat = np.asarray(heat, dtype=np.float32) / np.float32(self.clip)
        return np.clip(heat, -1.0 if self.signed else 0.0, 1.0)

    def rule(self):
        smoothing = {None: "", False: ", unsmoothed", True: f", smoothed (σ = {SMOOTH_SIGMA:g} × stride)"}[self.smoothed]
        return self.rule_text + smoothing

    def label(self, what="relevance"):
        sign = " (− against · + for)" if self.signed else ""
        return f"{what}{sign}\n{self.rule()}"


def display_map(heatmap, shape, stride=None, smooth=False):
    """The map at display resolution ``shape``; Gaussian-smoothed with σ = a quarter of the backbone's
    ``stride`` (in original-image pixels, scaled to the display) when ``smooth``."""
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != tuple(shape):
        heat = _resize(heat, shape)
    if smooth:
        if not stride:
            raise ValueError("smooth=True needs the backbone stride (pass stride=, or an Explanation)")
        from scipy.ndimage import gaussian_filter

        heat = gaussian_filter(heat, sigma=SMOOTH_SIGMA * stride * shape[1] / np.asarray(heatmap).shape[1])
    return heat


def overlay_heatmap(image, heatmap, alpha=0.6, scale=None, percentile=CLIP_PERCENTILE, signed=None):
    """RGB array: the image, in muted greyscale, blended with the colour-mapped heatmap (both at
    the heatmap's shape). The blend weight grows with |relevance| (``alpha`` at the scale's top), so strong relevance
    shows and faint relevance leaves the photo visible."""
    heat = np.asarray(heatmap, dtype=np.float32)
    base = np.asarray(image, dtype=np.float32) if isinstance(image, np.ndarray) and image.ndim == 3 else None
    base = as_array(image) if base is None else (base / 255.0 if base.max() > 1.0 else base)
    if base.shape[:2] != heat.shape:
        base = _resize(base.transpose(2, 0, 1), heat.shape).transpose(1, 2, 0)
    base = muted(base)
    scale = scale or Scale(heat, percentile, signed)
    level = scale.levels(heat)
    coloured = scale.cmap(scale.norm(level * scale.clip), bytes=True)[..., :3].astype(np.float32) / 255.0
    weight = (alpha * np.sqrt(np.abs(level)))[..., None]
    return base * (1 - weight) + coloured * weight


def muted(rgb):
    """The photo in light greyscale, so heat in any colour stands out on objects of any colour."""
    grey = np.asarray(rgb, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.repeat((0.3 + 0.6 * grey)[..., None], 3, axis=-1)


def _stride(explanation, width):
    grid = getattr(explanation, "grid", None)
    return width / grid.shape[-1] if grid is not None and grid.dim() >= 2 else None


def draw_heatmap(ax, image, heatmap, *, alpha=0.6, title=None, percentile=CLIP_PERCENTILE, signed=None,
                 smooth=False, stride=None, colorbar=True, contours=False):
    """The image with the heatmap over it; returns the ``Scale`` used. ``colorbar``: a colorbar
    beside ``ax`` saying what the colours mean; ``contours``: lines enclosing 50 % and 90 % of the
    positive relevance, with a legend."""
    heatmap = heatmap.numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    height, width = heatmap.shape
    base = as_array(image, side=DISPLAY_SIDE)
    heat = display_map(heatmap, base.shape[:2], stride, smooth)
    scale = Scale(heat, percentile, signed, smoothed=smooth if stride else None)
    extent = (0, width, height, 0)  # original-image pixel coordinates, whatever the display size
    ax.imshow(overlay_heatmap(base, heat, alpha, scale), extent=extent, interpolation="antialiased")
    if contours:
        _draw_contours(ax, heat, extent)
    if colorbar:
        bar = ax.figure.colorbar(ScalarMappable(scale.norm, scale.cmap), ax=ax, shrink=0.85, pad=0.02,
                                 extend="both" if scale.signed else "max")
        bar.set_label(scale.label(), fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title:
        ax.set_title(_wrap(title, ax), fontsize=10)
    ax.set_axis_off()
    return scale


def _draw_contours(ax, heat, extent):
    """Iso-lines enclosing 50 % and 90 % of the positive relevance, traced on a ≤ 256 px copy."""
    small = _resize(np.clip(heat, 0, None), _display_shape(*heat.shape, 256))
    levels = sorted({clip_value(small, 50.0), clip_value(small, 90.0)} - {0.0})
    if not levels:
        return
    styles = ["--", "-"][-len(levels):]  # ascending levels: the 90 % line (lower) first
    ax.contour(small, levels=levels, colors="white", linestyles=styles, linewidths=1.2, extent=extent,
               origin="upper")
    names = {"-": "50 % of + relevance inside", "--": "90 % of + relevance inside"}
    handles = [Line2D([], [], color="white", ls=ls, label=names[ls]) for ls in reversed(styles)]
    legend = ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6, facecolor="0.2",
                       labelcolor="white", edgecolor="none")
    legend.set_zorder(5)


def _wrap(title, ax, chars_per_inch=13):
    spec = ax.get_subplotspec()
    box = spec.get_position(ax.figure) if spec is not None else ax.get_position()
    width = box.width * ax.figure.bbox.width / ax.figure.dpi
    return "\n".join(textwrap.wrap(title, max(20, int(width * chars_per_inch))))


def plot_heatmap(image, heatmap, save=None, ax=None, title=None, **options):
    """The image with a heatmap overlay and its colorbar (options: see ``draw_heatmap``)."""
    fig, ax = _figure_and_ax(ax, (6, 5))
    draw_heatmap(ax, image, heatmap, title=title, **options)
    return _finish(fig, save)


def _figure_and_ax(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    fig = _new_figure(figsize)
    return fig, fig.add_subplot()


# ---------------------------------------------------------------- labels placed at draw time


class _Placement(Artist):
    """An invisible artist that, each time the figure is drawn, positions its texts from their
    measured extents (the layout is final by then). Drawn before them (lower zorder)."""

    zorder = 0

    def __init__(self, place):
        super().__init__()
        self._place = place

    def draw(self, renderer):
        self._place(renderer)


def _extent(text, renderer):
    """A text's box on the canvas, its background patch included."""
    patch = text.get_bbox_patch()
    if patch is None:
        return text.get_window_extent(renderer)
    text.update_bbox_position_size(renderer)
    return patch.get_window_extent(renderer)


def _overlaps(a, b, gap=0.0):
    return a.x0 < b.x1 + gap and b.x0 < a.x1 + gap and a.y0 < b.y1 + gap and b.y0 < a.y1 + gap


# ---------------------------------------------------------------- token strip


def is_special(token):
    return bool(SPECIAL_TOKEN.match(token))


def draw_tokens(ax, tokens, relevance, title=None, values=False, fontsize=9):
    """Caption tokens as text boxes coloured by relevance, wrapped to ``ax``'s width by their
    measured extents. Colours: relevance ÷ the largest |relevance| among the words (special
    tokens such as ``<s>`` are dimmed and left out of that scale); text is black or white,
    whichever contrasts more with its box. ``values``: print each token's relevance under it."""
    rel = np.asarray(relevance, dtype=np.float64)
    special = [is_special(t) for t in tokens]
    words = rel[[not s for s in special]] if not all(special) else rel
    scale = Scale(words, percentile=100.0)
    scale.clip = float(np.abs(words).max()) or 1.0
    ax.set_axis_off()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    texts = []
    for token, value, dim in zip(tokens, rel, special):
        face, ink = DIMMED if dim else (scale.cmap(scale.norm(np.clip(value, scale.norm.vmin, scale.clip))), None)
        label = f"{token}\n{value:+.2g}" if values else token
        texts.append(ax.text(0, 0, label, ha="left", va="top", fontsize=fontsize, multialignment="center",
                             color=ink or text_colour(face), style="italic" if dim else "normal",
                             bbox=dict(facecolor=face, edgecolor="none", boxstyle=f"square,pad={TOKEN_PAD}")))

    def place(renderer):
        frame = ax.get_window_extent(renderer)
        if frame.width <= 0 or frame.height <= 0:
            return
        size = fontsize
        while True:
            for t in texts:
                t.set_fontsize(size)
            spots = _flow(texts, frame, renderer)
            if spots is not None or size <= 4:
                break
            size -= 0.5  # the strip does not fit its axes: smaller text
        inverse = ax.transAxes.inverted()
        for t, (x, y) in zip(texts, spots or []):
            t.set_position(inverse.transform((x, y)))

    ax.add_artist(_Placement(place))
    if title:
        ax.set_title(title, fontsize=9)
    return texts


def _flow(texts, frame, renderer):
    """Top-left anchors (canvas pixels) laying ``texts`` out in lines like words, or None when
    they do not fit ``frame``."""
    pad = TOKEN_PAD * renderer.points_to_pixels(texts[0].get_fontsize())
    gap = 2 * pad
    sizes = [(e.width, e.height) for e in (t.get_window_extent(renderer) for t in texts)]
    line_height = max(h for _, h in sizes) + 2 * pad + gap
    x, y, spots = frame.x0 + pad, frame.y1 - pad, []
    for w, h in sizes:
        if x + w + pad > frame.x1 and x > frame.x0 + pad:
            x, y = frame.x0 + pad, y - line_height
        if x + w + pad > frame.x1 or y - line_height + gap < frame.y0:
            return None
        spots.append((x, y))
        x += w + 2 * pad + gap
    return spots


def plot_tokens(tokens, relevance, save=None, title=None, ax=None, values=False):
    """Token relevance as coloured caption text."""
    fig, ax = _figure_and_ax(ax, (8, 0.5 + 0.32 * (1 + len(" ".join(tokens)) // 70) * (2 if values else 1)))
    draw_tokens(ax, tokens, relevance, title=title, values=values)
    return _finish(fig, save)


# ---------------------------------------------------------------- detections


def phrase_colours(detections):
    colours = {}
    for d in detections:
        colours.setdefault(d.phrase, PHRASE_COLOURS[len(colours) % len(PHRASE_COLOURS)])
    return colours


def draw_detections(ax, detections, show_masks=True, colours=None, scores=True, fontsize=8):
    """Boxes (and masks) with non-overlapping labels that stay inside ``ax``."""
    colours = colours or phrase_colours(detections)
    labels = []
    for d in detections:
        colour = colours[d.phrase]
        x0, y0, x1, y1 = d.box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2.2))
        if show_masks and d.mask is not None:
            overlay = np.zeros((*d.mask.shape, 4), dtype=np.float32)
            overlay[d.mask] = (*colour[:3], 0.45)
            ax.imshow(overlay, extent=(0, d.mask.shape[1], d.mask.shape[0], 0))
        text = f"{d.phrase or '∅'} {d.score:.2f}" if scores else (d.phrase or "∅")
        labels.append(ax.text(x0, y0, text, color=text_colour(colour), fontsize=fontsize, clip_on=False,
                              bbox=dict(facecolor=colour, alpha=1.0, pad=1.5, edgecolor="none")))
    boxes = [d.box for d in detections]

    def place(renderer):
        frame = ax.get_window_extent(renderer)
        taken = []
        to_data = ax.transData.inverted()
        for t, (x0, y0, x1, y1) in zip(labels, boxes):
            t.set_ha("left"), t.set_va("bottom")
            t.set_position((0, 0))
            size = _extent(t, renderer)
            w, h = size.width, size.height
            (bx0, by_top), (bx1, by_bottom) = ax.transData.transform([(x0, y0), (x1, y1)])
            corners = [(bx0, by_top), (bx0, by_top - h), (bx0, by_bottom - h), (bx0, by_bottom),
                       (bx1 - w, by_top), (bx1 - w, by_bottom - h)]  # above, inside top, below, inside bottom …
            candidates = [(min(max(x, frame.x0), frame.x1 - w), min(max(y, frame.y0), frame.y1 - h))
                          for x, y in corners]
            spot = next((c for c in candidates if not any(_overlaps(_box(c, w, h), o, 1) for o in taken)), None)
            if spot is None:  # every corner is taken: slide down from the first until free
                x, y = candidates[0]
                while any(_overlaps(_box((x, y), w, h), o, 1) for o in taken) and y - h >= frame.y0:
                    y -= h / 2
                spot = (x, y)
            taken.append(_box(spot, w, h))
            margin = t.get_window_extent(renderer).p0 - size.p0  # the patch's pad around the text
            t.set_position(to_data.transform(np.asarray(spot) + margin))

    ax.add_artist(_Placement(place))
    return labels


def _box(corner, w, h):
    from matplotlib.transforms import Bbox

    return Bbox.from_bounds(corner[0], corner[1], w, h)


def plot_detections(prediction, image, save=None, ax=None, title=None, all_detections=False):
    """Boxes with their phrase and score (one colour per phrase), masks where the model has them.
    One box per phrase (the most confident) unless ``all_detections``."""
    from .grounding import one_per_phrase

    fig, ax = _figure_and_ax(ax, (7, 6))
    base = as_array(image, side=DISPLAY_SIDE)
    width, height = prediction.image_size
    ax.imshow(base, extent=(0, width, height, 0))
    draw_detections(ax, prediction.detections if all_detections else one_per_phrase(prediction.detections))
    caption = prediction.caption + (f"  →  {prediction.answer}" if prediction.answer else "")
    ax.set_title(title or _wrap(f"“{caption}”", ax), fontsize=10)
    ax.set_xlim(0, width), ax.set_ylim(height, 0)
    ax.set_axis_off()
    return _finish(fig, save)


# ---------------------------------------------------------------- explanations


def _heat(explanation):
    return explanation.image.numpy() if isinstance(explanation.image, torch.Tensor) else explanation.image


def draw_explanation(ax_image, ax_tokens, explanation, image, title=None, smooth=False, contours=False,
                     colorbar=True, values=False):
    heat = _heat(explanation)
    scale = draw_heatmap(ax_image, image, heat, title=title or explanation_title(explanation), smooth=smooth,
                         stride=_stride(explanation, heat.shape[1]), colorbar=colorbar, contours=contours)
    if ax_tokens is not None:
        draw_tokens(ax_tokens, explanation.token_strings, explanation.tokens.numpy(), values=values)
    return scale


def plot_explanation(explanation, image, save=None, prediction=None, smooth=False, contours=False, values=False,
                     title=None, fig=None):
    """Heatmap over the pixels, with a colorbar and the explained detection's box (when
    ``prediction`` is given), above the caption tokens coloured by their relevance."""
    fig = fig or _new_figure((6.5, 6.6))
    grid = fig.add_gridspec(2, 1, height_ratios=[6, 1.1 if values else 0.8])
    ax_image, ax_tokens = fig.add_subplot(grid[0]), fig.add_subplot(grid[1])
    draw_explanation(ax_image, ax_tokens, explanation, image, title, smooth, contours, values=values)
    if prediction is not None:
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


def plot_components(components, save=None, image=None, fig=None):
    """AGF's pieces at one layer, as in the paper's method figure: C, M, F_x, F_∇x, A and the result.

    ``components``: {name: (h, w) array}; missing pieces are skipped.
    """
    names = [n for n in ("C", "M", "F_x", "F_dx", "A", "result") if n in components]
    labels = {"F_dx": "F_∇x"}
    fig = fig or _new_figure((2.6 * (len(names) + (image is not None)), 2.9))
    axes = list(fig.subplots(1, len(names) + (image is not None), squeeze=False)[0])
    for ax in axes:
        ax.set_axis_off()
    if image is not None:
        axes.pop(0).imshow(as_array(image, side=DISPLAY_SIDE))
    for ax, name in zip(axes, names):
        value = np.asarray(components[name], dtype=np.float64)
        scale = Scale(value, percentile=100.0)
        scale.clip = float(np.abs(value).max()) or 1.0
        ax.imshow(value, cmap=scale.cmap, norm=scale.norm)
        ax.set_title(labels.get(name, name), fontsize=11)
        fig.colorbar(ScalarMappable(scale.norm, scale.cmap), ax=ax, shrink=0.7, pad=0.02).ax.tick_params(labelsize=6)
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
