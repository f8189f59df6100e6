"""A contrast's figure pieces: "why this box for the phrase, and not that one".

The map of a ``ContrastTarget`` is signed by construction (the score is a difference), so it is
always drawn with the diverging colormap: red for the explained side (A), blue for the other (B),
the colorbar's ends saying which is which. A's box is drawn in the map's red, B's dashed in a
muted blue-grey, so the eye reads the boxes and the colours the same way.
"""
from collections import namedtuple

from .labels import draw_detections
from .style import method_name

CONTRAST_COLOURS = ((0.70, 0.09, 0.17), (0.47, 0.56, 0.69))  # A: RdBu's red end; B: a muted blue-grey
_Shown = namedtuple("_Shown", "box phrase score mask")


def is_contrast(explanation):
    return getattr(explanation, "versus", None) is not None


def contrast_title(explanation):
    """"AGF: “the small red circle” here, not there" (another box), or
    "AGF: “the small red circle”, not “circle”, in this box" (another phrase, the same box)."""
    name, phrase = method_name(explanation.method), explanation.phrase or str(explanation.target.target)
    if isinstance(explanation.versus, str):
        return f"{name}: “{phrase}”, not “{explanation.versus}”, in this box"
    return f"{name}: “{phrase}” here, not there"


def contrast_sides(explanation):
    """What the map's + and − stand for, as the colorbar and the box labels name them."""
    if isinstance(explanation.versus, str):
        return f"“{explanation.phrase}”", f"“{explanation.versus}”"
    return "A (here)", "B (there)"


def draw_contrast_boxes(ax, explanation, prediction=None):
    """A's box (the explained query) and B's (the other query), from ``explanation.boxes`` or else
    from ``prediction``'s detections; one box when the contrast is between two phrases."""
    target, boxes = explanation.target, dict(explanation.boxes or {})
    if not boxes and prediction is not None:
        boxes = {d.query: d.box for d in prediction.detections}
    side_a, side_b = contrast_sides(explanation)
    shown, colours, styles = [], {}, {}
    other = getattr(target.versus, "query", None)
    for query, label, colour, style in ((target.query, side_a, CONTRAST_COLOURS[0], "-"),
                                        (other, side_b, CONTRAST_COLOURS[1], "--")):
        if query in boxes and not (query == target.query and label == side_b):
            name = f"{label}: query {query}" if query != target.query or other != target.query else f"query {query}"
            shown.append(_Shown(boxes[query], name, 0.0, None))
            colours[name], styles[name] = colour, style
    return draw_detections(ax, shown, show_masks=False, colours=colours, scores=False, linestyles=styles)
