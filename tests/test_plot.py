"""Figures show what they claim, checked on rendered pixels and the renderer's text extents:
every method's panel shows heat, AGF's heat sits on the named object, labels are readable and
never overlap, one box per phrase, matplotlib conventions."""
import itertools

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from mdetr_agf import plot
from mdetr_agf.demo import DEMO_SEED, demo_figure, explain_detections
from mdetr_agf.explanation import Explanation
from mdetr_agf.grounding import one_per_phrase
from mdetr_agf.prediction import Detection, Prediction, predict
from mdetr_agf.shapesworld import make_scene

METHODS = ["agf", "gae", "rollout", "raw_attention", "gradcam", "grad_x_input"]


def grey_image(w=80, h=60):
    return Image.new("RGB", (w, h), (128, 128, 128))


def peaked_heatmap(h=60, w=80, at=(15, 60)):
    yy, xx = np.mgrid[:h, :w]
    return np.exp(-((yy - at[0]) ** 2 + (xx - at[1]) ** 2) / 20.0)


def rendered(fig):
    FigureCanvasAgg(fig).draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float64) / 255.0


def text_boxes(fig):
    """(text, canvas extent incl. its background box) of every visible text of a drawn figure."""
    renderer = fig.canvas.get_renderer()
    texts = [t for ax in fig.axes for t in [*ax.texts, ax.title, ax.xaxis.label, ax.yaxis.label]]
    return [(t.get_text(), plot._extent(t, renderer)) for t in texts if t.get_text() and t.get_visible()]


def assert_no_overlaps(fig):
    boxes = text_boxes(fig)
    clashes = [(a, b) for (a, ea), (b, eb) in itertools.combinations(boxes, 2) if plot._overlaps(ea, eb)]
    assert not clashes, f"overlapping labels: {clashes[:5]}"
    return boxes


@pytest.fixture(scope="module")
def demo(toy):
    """The demo scene, its prediction, and every method's explanation of each phrase's detection."""
    scene = make_scene(DEMO_SEED)
    prediction = predict(toy, scene.image, scene.caption)
    shown = one_per_phrase(prediction.detections)
    maps = {m: explain_detections(toy, scene.image, scene.caption, shown, m) for m in METHODS}
    return scene, prediction, shown, maps


# ---------------------------------------------------------------- the demo scene


def test_demo_scene_names_two_objects_of_one_shape_each_detected_once(demo):
    scene, prediction, shown, _ = demo
    named = [scene.objects[p.object_index] for p in scene.phrases]
    assert len(named) == 2 and named[0].shape == named[1].shape and named[0] is not named[1]
    assert sorted(d.phrase for d in shown) == sorted(p.text for p in scene.phrases)
    assert len(prediction.detections) > len(shown)  # the toy finds one phrase twice; it is shown once


def panel_heat(fig, reference, ax):
    """(|difference| per pixel, its region's top-left in canvas pixels, pixels per image pixel) of one panel."""
    box = ax.get_window_extent()
    height = fig.canvas.get_width_height()[1]
    rows = slice(int(height - box.y1) + 1, int(height - box.y0) - 1)
    cols = slice(int(box.x0) + 1, int(box.x1) - 1)
    return np.abs(fig.rendered[rows, cols] - reference.rendered[rows, cols]), fig.rendered[rows, cols]


def test_comparison_grid_every_panel_shows_heat_and_agf_lands_on_each_named_object(demo):
    scene, _, shown, maps = demo
    grid = [[maps[m][i] for m in METHODS] for i in range(len(shown))]
    fig = plot.plot_comparison(grid, scene.image)
    bare = [[Explanation(torch.zeros_like(e.image), e.tokens, e.token_strings, e.target, e.method, e.caption, e.grid)
             for e in row] for row in grid]
    reference = plot.plot_comparison(bare, scene.image)
    fig.rendered, reference.rendered = rendered(fig), rendered(reference)
    panels = np.array(fig.axes[: len(grid) * len(METHODS)]).reshape(len(grid), len(METHODS))
    width, height = scene.image.size
    for r, detection in enumerate(shown):
        for c, method in enumerate(METHODS):
            diff, _ = panel_heat(fig, reference, panels[r, c])
            visible = (diff.max(-1) > 0.1).mean()
            assert visible >= 0.02, f"{method} for {detection.phrase!r}: only {visible:.1%} of its panel shows heat"
        diff, pixels = panel_heat(fig, reference, panels[r, 0])  # AGF: where is the heat *for* the phrase?
        weight = diff.sum(-1) * (pixels[..., 0] > pixels[..., 2])  # red (for) beats blue (against)
        ys, xs = np.mgrid[: weight.shape[0], : weight.shape[1]]
        cx = (weight * xs).sum() / weight.sum() * width / weight.shape[1]
        cy = (weight * ys).sum() / weight.sum() * height / weight.shape[0]
        phrase = next(p for p in scene.phrases if p.text == detection.phrase)
        x0, y0, x1, y1 = scene.objects[phrase.object_index].box_xyxy
        assert x0 <= cx < x1 and y0 <= cy < y1, f"AGF heat centroid {(cx, cy)} outside {phrase.text!r} {(x0, y0, x1, y1)}"
    assert_no_overlaps(fig)
    bars = [ax for ax in fig.axes[len(grid) * len(METHODS):]]
    assert bars and all("clip value" in b.get_ylabel() and "99th percentile saturate" in b.get_ylabel() for b in bars)


def test_demo_figure_titles_name_phrases_labels_are_readable_and_apart(demo):
    scene, prediction, shown, maps = demo
    fig = demo_figure(prediction, maps["agf"], scene.image, "toy")
    rendered(fig)
    boxes = assert_no_overlaps(fig)
    titles = [ax.get_title() for ax in fig.axes]
    for d in shown:
        assert f"AGF for “{d.phrase}”" in titles
    for ax in fig.axes:  # box labels stay inside their axes
        frame = ax.get_window_extent()
        for t in ax.texts:
            if t.get_text() in {d.phrase for d in shown} | {f"{d.phrase} {d.score:.2f}" for d in shown}:
                e = plot._extent(t, fig.canvas.get_renderer())
                assert frame.x0 - 1 <= e.x0 and e.x1 <= frame.x1 + 1 and frame.y0 - 1 <= e.y0 and e.y1 <= frame.y1 + 1
    assert len(boxes) > 10
    labelled = [t for ax in fig.axes for t in ax.texts if t.get_bbox_patch() is not None]
    assert labelled and all(plot.contrast(t.get_color(), t.get_bbox_patch().get_facecolor()) >= 4.5 for t in labelled)
    # every explanation panel has its colorbar
    assert sum("relevance" in ax.get_ylabel() for ax in fig.axes) == len(shown)


# ---------------------------------------------------------------- token strip


def test_token_strip_contrast_wrapping_values_and_dimmed_specials():
    tokens = ["<s>", "the", "extraordinarily", "large", "reddish", "circumference", "green", "diamond", "and",
              "a", "small", "blue", "triangle", "</s>"]
    relevance = np.linspace(-0.5, 1.0, len(tokens))
    fig = Figure(figsize=(3.0, 1.4))  # narrow: the strip must wrap onto several lines
    ax = fig.add_subplot()
    texts = plot.draw_tokens(ax, tokens, relevance, values=True)
    rendered(fig)
    assert [t.get_text().split("\n")[0] for t in texts] == tokens
    assert all(t.get_text().split("\n")[1] == f"{v:+.2g}" for t, v in zip(texts, relevance))
    renderer = fig.canvas.get_renderer()
    extents = [plot._extent(t, renderer) for t in texts]
    assert len({round(e.y0) for e in extents}) >= 3  # wrapped
    frame = ax.get_window_extent()
    assert all(frame.x0 - 1 <= e.x0 and e.x1 <= frame.x1 + 1 and e.y0 >= frame.y0 - 1 for e in extents)
    assert_no_overlaps(fig)
    for t in texts:
        assert plot.contrast(t.get_color(), t.get_bbox_patch().get_facecolor()) >= 4.5, t.get_text()
    special = [t for t in texts if t.get_text().startswith(("<s>", "</s>"))]
    assert all(t.get_bbox_patch().get_facecolor()[:3] == pytest.approx(plot.DIMMED[0]) for t in special)
    faces = {t.get_text().split("\n")[0]: t.get_bbox_patch().get_facecolor() for t in texts}
    assert faces["triangle"] != faces["the"]  # coloured by value (signed: diverging)


def test_every_colour_of_both_colormaps_gets_readable_text():
    for name in (plot.SEQUENTIAL_CMAP, plot.DIVERGING_CMAP):
        for level in np.linspace(0, 1, 101):
            face = matplotlib.colormaps[name](level)
            assert plot.contrast(plot.text_colour(face), face) >= 4.5
    assert plot.contrast("white", "black") == pytest.approx(21.0)


# ---------------------------------------------------------------- scale, sign, smoothing


def test_clip_value_saturates_the_stated_share_of_mass():
    values = np.concatenate([np.ones(90), np.full(10, 100.0)])  # 10 spikes hold 1000 of 1090
    assert plot.clip_value(values, 10.0) == 100.0
    assert plot.clip_value(values, 95.0) == 1.0
    spiky = np.zeros(10_000)
    spiky[:30] = np.linspace(1, 35, 30)  # mostly zero, like an AGF map: max-scaling shows nothing
    clip = plot.clip_value(spiky, plot.OUTLIER_PERCENT)
    assert 0 < clip < spiky.max() and spiky[spiky > clip].sum() <= plot.OUTLIER_PERCENT / 100 * spiky.sum()


def test_a_spiky_map_is_shown_not_blank():
    """An AGF-like map: 90 % of pixels zero, a few spikes 35× the typical value. Scaled to its
    maximum, its typical relevance would get under a tenth of the colour range."""
    rng = np.random.default_rng(0)
    heat = np.zeros(100_000)
    heat[:9_000] = rng.uniform(0.5, 2.0, 9_000)
    heat[9_000:10_000] = rng.uniform(5.0, 35.0, 1_000)
    level = plot.Scale(heat).levels(heat)
    typical = slice(0, 9_000)
    assert np.median(heat[typical] / heat.max()) < 0.05  # what max-scaling shows
    assert np.median(level[typical]) > 0.1 and (level[heat > 0] >= 0.25).mean() > 0.2  # what the display shows
    assert (level == 1.0).sum() >= 900  # the spikes saturate instead of setting the scale
    sparse = np.zeros(100_000)
    sparse[:50] = np.linspace(1, 35, 50)  # zero at 99.95 % of pixels: the mass rule takes over
    scale = plot.Scale(sparse)
    assert 0 < scale.clip < 35 and "mass" in scale.rule()


def test_signed_maps_are_diverging_and_symmetric_non_negative_are_sequential():
    signed = peaked_heatmap() - peaked_heatmap(at=(40, 20))
    fig = plot.plot_heatmap(grey_image(), signed)
    bar = fig.axes[1]
    assert "against" in bar.get_ylabel() and bar.get_ylim()[0] == pytest.approx(-bar.get_ylim()[1])
    blended = plot.overlay_heatmap(grey_image(), signed)
    assert blended[15, 60, 0] > blended[15, 60, 2] and blended[40, 20, 2] > blended[40, 20, 0]  # red for, blue against
    fig = plot.plot_heatmap(grey_image(), peaked_heatmap())
    assert "against" not in fig.axes[1].get_ylabel() and fig.axes[1].get_ylim()[0] == 0
    blended = plot.overlay_heatmap(grey_image(), peaked_heatmap())
    change = np.abs(blended - plot.muted(np.asarray(grey_image()) / 255.0)).sum(-1)
    assert change[15, 60] > 0.3 and change[55, 5] < 0.01  # the peak is coloured, far from it the photo shows
    assert plot.Scale(peaked_heatmap()).levels(peaked_heatmap())[15, 60] == 1.0  # … at the top of the scale


def test_smoothing_is_optional_stated_and_spreads_a_speck():
    speck = np.zeros((64, 64))
    speck[32, 32] = 1.0
    on = plot.plot_heatmap(grey_image(64, 64), speck, smooth=True, stride=16)
    off = plot.plot_heatmap(grey_image(64, 64), speck)
    assert "smoothed (σ" in on.axes[1].get_ylabel() and "unsmoothed" not in on.axes[1].get_ylabel()
    assert (plot.display_map(speck, (64, 64), 16, smooth=True) > 0.01 * 1 / (2 * np.pi * 16)).sum() > 50
    assert (plot.display_map(speck, (64, 64), 16, smooth=False) > 0).sum() == 1
    assert "smoothed (σ" not in off.axes[1].get_ylabel()
    with pytest.raises(ValueError, match="stride"):
        plot.display_map(speck, (64, 64), None, smooth=True)


def test_contours_come_with_a_legend_and_only_when_asked():
    fig = plot.plot_heatmap(grey_image(), peaked_heatmap(), contours=True)
    legend = fig.axes[0].get_legend()
    assert legend is not None and any("50 %" in t.get_text() for t in legend.get_texts())
    assert plot.plot_heatmap(grey_image(), peaked_heatmap()).axes[0].get_legend() is None


def test_a_large_image_is_drawn_at_display_resolution():
    big = Image.new("RGB", (4000, 3000), (90, 120, 150))
    heat = np.zeros((3000, 4000), dtype=np.float32)
    heat[1000:1200, 2500:2700] = 1.0
    fig = plot.plot_heatmap(big, heat)
    shown = fig.axes[0].images[0].get_array()
    assert max(shown.shape[:2]) <= plot.DISPLAY_SIDE
    assert fig.axes[0].images[0].get_extent() == [0, 4000, 3000, 0]  # still in the photo's pixel coordinates


# ---------------------------------------------------------------- detections


def test_duplicates_of_a_phrase_are_drawn_once_unless_asked():
    dets = [Detection(3, 0.91, (10, 5, 40, 30), [2], [(4, 9)], "small"),
            Detection(5, 0.85, (12, 6, 41, 31), [2], [(4, 9)], "small"),
            Detection(7, 0.80, (45, 20, 75, 55), [5], [(14, 20)], "square")]
    prediction = Prediction("the small red square", (80, 60), dets)
    fig = plot.plot_detections(prediction, grey_image())
    rendered(fig)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["small 0.91", "square 0.80"]
    boxes = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert len(boxes) == 2 and boxes[0].get_edgecolor() != boxes[1].get_edgecolor()
    every = plot.plot_detections(prediction, grey_image(), all_detections=True)
    rendered(every)
    assert len(every.axes[0].texts) == 3
    assert_no_overlaps(every)  # the near-identical boxes' labels are placed apart
    frame = every.axes[0].get_window_extent()
    for t in every.axes[0].texts:
        e = plot._extent(t, every.canvas.get_renderer())
        assert frame.x0 - 1 <= e.x0 and e.x1 <= frame.x1 + 1 and frame.y0 - 1 <= e.y0 and e.y1 <= frame.y1 + 1


def test_explain_with_a_phrase_uses_the_box_drawn_for_it(toy, demo):
    import mdetr_agf

    scene, _, shown, _ = demo
    for d in shown:
        expl = mdetr_agf.explain(toy, scene.image, scene.caption, phrase=d.phrase)
        assert expl.target.query == d.query and expl.phrase == d.phrase
        assert plot.explanation_title(expl) == f"AGF for “{d.phrase}”"


def contrast_case(toy):
    """AGF's contrast on the gallery's confusable scene (as ``scripts/make_figures.py`` draws it),
    with the named object and its twin."""
    import sys

    from mdetr_agf.shapesworld import twin

    if str(REPO / "scripts") not in sys.path:
        sys.path.insert(0, str(REPO / "scripts"))
    from make_figures import CONTRAST_SEED, contrast_explanation

    scene = make_scene(CONTRAST_SEED, confusable=True)
    phrase = scene.phrases[0]
    named, other = scene.objects[phrase.object_index], scene.objects[twin(scene, phrase.object_index)]
    return scene, phrase, named, other, contrast_explanation(toy, scene, phrase)


def test_the_contrast_figure_says_here_not_there_draws_both_boxes_and_a_signed_map(toy):
    from torchvision.ops import box_iou

    from mdetr_agf.evaluate import box_mask, specific

    scene, phrase, named, other, expl = contrast_case(toy)
    fig = plot.plot_explanation(expl, scene.image)
    rendered(fig)
    ax = fig.axes[0]
    assert ax.get_title() == f"AGF: “{phrase.text}” here, not there"
    solid, dashed = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert solid.get_linestyle() == "-" and dashed.get_linestyle() == "--"
    assert np.allclose(solid.get_edgecolor()[:3], plot.CONTRAST_COLOURS[0])
    assert np.allclose(dashed.get_edgecolor()[:3], plot.CONTRAST_COLOURS[1])
    assert [t.get_text().split(":")[0] for t in ax.texts] == ["A (here)", "B (there)"]
    drawn = torch.tensor([[b.get_x(), b.get_y(), b.get_x() + b.get_width(), b.get_y() + b.get_height()]
                          for b in (solid, dashed)])
    assert box_iou(drawn, torch.tensor([named.box_xyxy, other.box_xyxy])).diagonal().min() > 0.4  # A on the named
    [bar] = [a for a in fig.axes if a.get_label() == "<colorbar>"]
    assert [t.get_text() for t in bar.get_yticklabels()] == ["for B (there)", "0", "for A (here)"]
    assert bar.get_ylim()[0] == pytest.approx(-bar.get_ylim()[1])  # diverging, symmetric around 0
    # the signed map: positive mass in A's box, negative in B's
    values = expl.image.numpy()
    assert specific(values, named.mask, other.mask) == 1.0
    in_a, in_b = (values[box_mask(values.shape, o.box_xyxy)].sum() for o in (named, other))
    assert in_a > 0 > in_b


# ---------------------------------------------------------------- conventions


def test_figures_follow_matplotlib_conventions(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    expl = Explanation(torch.from_numpy(peaked_heatmap()), torch.tensor([0.0, 1.0, 0.2]), ["<s>", "red", "</s>"],
                       "query 3, tokens [1]", "agf", "red", torch.zeros(4, 5), phrase="red")
    fig = Figure()
    ax = fig.add_subplot()
    assert plot.plot_heatmap(grey_image(), peaked_heatmap(), ax=ax) is fig
    assert plot.plot_tokens(["a", "b"], [1, 2], ax=fig.add_subplot(2, 1, 2)) is fig
    figures = [plot.plot_explanation(expl, grey_image()), plot.plot_comparison([[expl, expl], [expl, expl]], grey_image()),
               plot.plot_answer({"type": {"yes/no": 0.7, "count": 0.3}, "count": {"0": 0.4, "1": 0.6}})]
    assert all(isinstance(f, Figure) for f in figures) and plt.get_fignums() == before  # no pyplot state
    assert plot.explanation_title(expl) == "AGF for “red”"
    for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF"), (".svg", b"<?xml")):
        path = plot.save(figures[0], tmp_path / f"e{suffix}")
        assert path.read_bytes()[:len(magic)] == magic
    dpi = Image.open(tmp_path / "e.png").info["dpi"]
    assert dpi[0] == pytest.approx(plot.SAVE_DPI, abs=0.5)
    assert [ax.get_title() for ax in figures[2].axes] == ["type", "count"]


def test_plot_is_reachable_from_the_package():
    import mdetr_agf
    from mdetr_agf import plot as imported

    assert mdetr_agf.plot is imported is plot


# ---------------------------------------------------------------- the gallery script

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def run_gallery(*args, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(REPO / "scripts" / "make_figures.py"), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=1800)


def test_gallery_script_writes_every_committed_figure(tmp_path):
    from conftest import CONFORMANCE

    done = run_gallery("--out", str(tmp_path), env={"MDETR_AGF_CONFORMANCE": str(CONFORMANCE)})
    assert done.returncode == 0, done.stderr[-3000:]
    committed = sorted(p.name for p in (REPO / "docs" / "gallery").glob("*.png"))
    assert {"teaser.png", "demo.png", "comparison.png", "tokens.png", "contrast.png", "phrasecut.png",
            "qa.png"} <= set(committed)
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    expected = committed if (CONFORMANCE / "weights.py").is_file() else \
        [n for n in committed if n not in ("phrasecut.png", "qa.png")]
    assert written == expected, done.stdout
    for name in written:
        with Image.open(tmp_path / name) as png:
            assert png.format == "PNG" and max(png.size) > 200 and min(png.size) > 64  # token strips are short
            assert np.asarray(png.convert("L")).std() > 10  # not blank
    with Image.open(tmp_path / "teaser.png") as teaser:
        assert teaser.width > 2 * teaser.height  # a wide banner for the README's top


def test_gallery_says_what_it_skips_without_the_conformance_fixtures(tmp_path):
    done = run_gallery("--out", str(tmp_path), "--figures", "phrasecut,qa", "--conformance", str(tmp_path / "none"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped phrasecut.png and qa.png" in done.stdout and "MDETR_AGF_CONFORMANCE" in done.stdout
    assert not list(tmp_path.glob("*.png"))
    bad = run_gallery("--out", str(tmp_path), "--figures", "teaser,bogus")
    assert bad.returncode != 0 and "unknown figure(s) bogus" in bad.stderr
