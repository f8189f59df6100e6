"""The ready-made example behind ``mdetr-agf demo`` and the notebook's first cells.

Offline (``MDETR_AGF_OFFLINE=1``, no network, or no model named) it uses the bundled toy model
on a generated ShapesWorld scene, so a fresh install shows boxes, a heatmap and token relevance
without downloading anything. Online it uses a COCO validation photo and a real checkpoint.
"""
import os
import socket

from matplotlib.figure import Figure

DEFAULT_MODEL = "mdetr_efficientnetB3_refcocog"
COCO_EXAMPLE = ("http://images.cocodataset.org/val2017/000000039769.jpg", "two cats lying on a pink blanket")


def offline():
    """``MDETR_AGF_OFFLINE=1`` / ``=0`` decide; unset, offline means zenodo.org is unreachable (3 s)."""
    setting = os.environ.get("MDETR_AGF_OFFLINE", "").lower()
    if setting in ("1", "true", "yes"):
        return True
    if setting in ("0", "false", "no"):
        return False
    try:
        socket.create_connection(("zenodo.org", 443), timeout=3).close()
        return False
    except OSError:
        return True


def default_model():
    """The notebook's checkpoint: a RefCOCOg model online, the bundled toy model offline."""
    return "toy" if offline() else DEFAULT_MODEL


def example(model_name=None, seed=1_000_003):
    """(model name, image, caption): the toy model and a ShapesWorld scene, or a COCO photo."""
    if model_name in (None, "toy") or offline():
        from .shapesworld import make_scene

        scene = make_scene(seed)
        return "toy", scene.image, scene.caption
    return model_name, *COCO_EXAMPLE


def run_demo(model_name=None, out="demo.png", seed=1_000_003, method="agf"):
    from .explain import explain
    from .models import load_model
    from .plot import draw_detections, draw_heatmap, draw_tokens, as_array
    from .prediction import predict

    name, image, caption = example(model_name, seed)
    model = load_model(name)
    prediction = predict(model, image, caption)
    best = prediction.detections[:2] or []
    queries = [d.query for d in best] or [None]
    explanations = [explain(model, image, caption, query=q, method=method) for q in queries]

    fig = Figure(figsize=(4.2 * (1 + len(explanations)), 5.4))
    grid = fig.add_gridspec(2, 1 + len(explanations), height_ratios=[5, 1])
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(as_array(image))
    draw_detections(ax, prediction.detections)
    ax.set_title(f"{name}: “{caption}”", fontsize=10)
    ax.axis("off")
    fig.add_subplot(grid[1, 0]).axis("off")
    for i, expl in enumerate(explanations):
        detection = best[i] if i < len(best) else None
        label = f"{method.upper()} for “{detection.phrase}”" if detection else f"{method.upper()}: {expl.target}"
        draw_heatmap(fig.add_subplot(grid[0, i + 1]), image, expl.image.numpy(), contours=True, title=label)
        draw_tokens(fig.add_subplot(grid[1, i + 1]), expl.token_strings, expl.tokens.numpy())
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out
