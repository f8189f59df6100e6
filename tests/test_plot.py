"""Plot helpers render (Agg) and show what they claim: colour where the heatmap peaks, the labels."""
import matplotlib

matplotlib.use("Agg")

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from mdetr_agf import plot
from mdetr_agf.explain.api import Explanation
from mdetr_agf.prediction import Detection, Prediction


def grey_image(w=80, h=60):
    return Image.new("RGB", (w, h), (128, 128, 128))


def peaked_heatmap(h=60, w=80, at=(15, 60)):
    yy, xx = np.mgrid[:h, :w]
    return np.exp(-((yy - at[0]) ** 2 + (xx - at[1]) ** 2) / 20.0)


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [ax.get_title() for ax in fig.axes]


def test_overlay_changes_pixels_where_the_heatmap_peaks():
    image, heat = grey_image(), peaked_heatmap()
    blended = plot.overlay_heatmap(image, heat)
    base = np.asarray(image) / 255.0
    change = np.abs(blended - base).sum(-1)
    assert change[15, 60] > 0.3  # the peak is coloured
    assert change[55, 5] < 0.01  # far from it the photo shows through
    assert np.unravel_index(change.argmax(), change.shape) == (15, 60)


def test_detections_draw_boxes_and_phrase_labels(tmp_path):
    dets = [Detection(3, 0.91, (10, 5, 40, 30), [2], [(4, 9)], "small"),
            Detection(7, 0.80, (45, 20, 75, 55), [5], [(14, 20)], "square")]
    fig = plot.plot_detections(Prediction("the small red square", (80, 60), dets), grey_image(),
                               save=tmp_path / "d.png")
    assert isinstance(fig, Figure)
    labels = texts(fig)
    assert "small 0.91" in labels and "square 0.80" in labels
    boxes = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert len(boxes) == 2 and boxes[0].get_edgecolor() != boxes[1].get_edgecolor()  # a colour per phrase
    assert (tmp_path / "d.png").stat().st_size > 1000


def test_token_relevance_shows_every_token_coloured_by_value():
    fig = plot.plot_tokens(["<s>", "the", "red", "cube", "</s>"], [0.0, 0.1, 1.0, 0.5, 0.0])
    boxes = {t.get_text(): t.get_bbox_patch().get_facecolor() for t in fig.axes[0].texts}
    assert list(boxes) == ["<s>", "the", "red", "cube", "</s>"]
    assert boxes["red"] != boxes["the"]


def test_explanation_and_comparison_figures(tmp_path):
    expl = Explanation(torch.from_numpy(peaked_heatmap()), torch.tensor([0.0, 1.0, 0.2]), ["<s>", "red", "</s>"],
                       "query 3, tokens [1]", "agf", "red")
    fig = plot.plot_explanation(expl, grey_image(), save=tmp_path / "e.pdf")
    assert "red" in texts(fig) and (tmp_path / "e.pdf").read_bytes()[:4] == b"%PDF"
    grid = plot.plot_comparison([[expl, expl], [expl, expl]], grey_image())
    assert len(grid.axes) == 4


def test_components_and_answer_panels():
    parts = {k: peaked_heatmap() * s for k, s in (("C", 1), ("M", 2), ("F_x", -1), ("F_dx", 1), ("A", 1),
                                                  ("result", 1))}
    fig = plot.plot_components(parts, image=grey_image())
    assert [ax.get_title() for ax in fig.axes][1:] == ["C", "M", "F_x", "F_∇x", "A", "result"]
    fig = plot.plot_answer({"type": {"yes/no": 0.7, "count": 0.3}, "answer": {"yes": 0.9, "no": 0.1}})
    assert {"yes/no", "count"} <= {t.get_text() for t in fig.axes[0].get_yticklabels()}
