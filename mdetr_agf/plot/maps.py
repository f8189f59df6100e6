"""Relevance maps over images: display size, the colour scale (``Scale``), overlays, contours."""
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D
from PIL import Image

from ..images import load_image
from .style import (CLIP_PERCENTILE, DISPLAY_SIDE, DIVERGING_CMAP, OUTLIER_PERCENT, SEQUENTIAL_CMAP, SMOOTH_SIGMA,
                    _figure_and_ax, _finish, _wrap)


def _display_shape(height, width, side=DISPLAY_SIDE):
    scale = min(1.0, side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def as_array(image, side=None):
    """H×W×3 float array in [0, 1] from a PIL image, path, URL, array or normalized tensor,
    resized so its long side is at most ``side`` pixels (None: as it is)."""
    if isinstance(image, torch.Tensor):
        from ..images import denormalize

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
                 smooth=False, stride=None, colorbar=True, contours=False, sides=None):
    """The image with the heatmap over it; returns the ``Scale`` used. ``colorbar``: a colorbar
    beside ``ax`` saying what the colours mean; ``contours``: lines enclosing 50 % and 90 % of the
    positive relevance, with a legend. ``sides``: (what + means, what − means) for a contrast's
    signed map, written at the colorbar's ends (the map is then drawn signed)."""
    heatmap = heatmap.numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    height, width = heatmap.shape
    base = as_array(image, side=DISPLAY_SIDE)
    heat = display_map(heatmap, base.shape[:2], stride, smooth)
    scale = Scale(heat, percentile, True if sides else signed, smoothed=smooth if stride else None)
    extent = (0, width, height, 0)  # original-image pixel coordinates, whatever the display size
    ax.imshow(overlay_heatmap(base, heat, alpha, scale), extent=extent, interpolation="antialiased")
    if contours:
        _draw_contours(ax, heat, extent)
    if colorbar:
        bar = ax.figure.colorbar(ScalarMappable(scale.norm, scale.cmap), ax=ax, shrink=0.85, pad=0.02,
                                 extend="both" if scale.signed else "max")
        bar.set_label(scale.label() if not sides else f"relevance\n{scale.rule()}", fontsize=8)
        bar.ax.tick_params(labelsize=7)
        if sides:
            bar.set_ticks([-scale.clip, 0, scale.clip], labels=[f"for {sides[1]}", "0", f"for {sides[0]}"])
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


def plot_heatmap(image, heatmap, save=None, ax=None, title=None, **options):
    """The image with a heatmap overlay and its colorbar (options: see ``draw_heatmap``)."""
    fig, ax = _figure_and_ax(ax, (6, 5))
    draw_heatmap(ax, image, heatmap, title=title, **options)
    return _finish(fig, save)
