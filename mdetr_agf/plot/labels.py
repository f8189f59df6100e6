"""Text placed at draw time from measured extents: the token strip and the detection labels."""
import numpy as np
from matplotlib.artist import Artist
from matplotlib.patches import Rectangle

from .maps import DISPLAY_SIDE, Scale, as_array
from .style import DIMMED, PHRASE_COLOURS, SPECIAL_TOKEN, TOKEN_PAD, _figure_and_ax, _finish, _wrap, text_colour


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


def is_special(token):
    return bool(SPECIAL_TOKEN.match(token))


def draw_tokens(ax, tokens, relevance, title=None, values=False, fontsize=9, signed=None):
    """Caption tokens as text boxes coloured by relevance, wrapped to ``ax``'s width by their
    measured extents. Colours: relevance ÷ the largest |relevance| among the words (special
    tokens such as ``<s>`` are dimmed and left out of that scale); text is black or white,
    whichever contrasts more with its box. ``values``: print each token's relevance under it.
    ``signed``: force the diverging (True) or sequential (False) colours (default: by the values)."""
    rel = np.asarray(relevance, dtype=np.float64)
    special = [is_special(t) for t in tokens]
    words = rel[[not s for s in special]] if not all(special) else rel
    scale = Scale(words, percentile=100.0, signed=signed)
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


def phrase_colours(detections):
    colours = {}
    for d in detections:
        colours.setdefault(d.phrase, PHRASE_COLOURS[len(colours) % len(PHRASE_COLOURS)])
    return colours


def draw_detections(ax, detections, show_masks=True, colours=None, scores=True, fontsize=8, linestyles=None):
    """Boxes (and masks) with non-overlapping labels that stay inside ``ax``; ``colours`` and
    ``linestyles``: by phrase (default: one colour per phrase, solid lines)."""
    colours = colours or phrase_colours(detections)
    labels = []
    for d in detections:
        colour = colours[d.phrase]
        x0, y0, x1, y1 = d.box
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=2.2,
                               linestyle=(linestyles or {}).get(d.phrase, "-")))
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
    from ..grounding import one_per_phrase

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
