"""Every bad input gets a typed error that says what was wrong; every odd but valid image works.

Runs on the bundled toy model (real weights, offline). After each failure the model must still
give the same outputs as before: nothing is left half-changed.
"""
import http.server
import socket
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import mdetr_agf
from mdetr_agf import cli
from mdetr_agf.errors import (DownloadError, FileMissingError, InputError, InputTypeError, MdetrAgfError,
                              UnknownNameError)
from mdetr_agf.images import load_image, prepare, resized_shape
from mdetr_agf.shapesworld import make_scene

from conftest import scene_logits

TYPED = (ValueError, TypeError, LookupError, OSError)


@pytest.fixture(scope="module")
def scene():
    return make_scene(1_000_001)


@pytest.fixture
def unchanged(toy, scene):
    """Asserts after the test that the model's outputs are bit-identical to before."""
    before = scene_logits(toy, scene)
    yield
    assert torch.equal(scene_logits(toy, scene), before), "the model changed after a failed call"


def rgb(scene):
    return np.asarray(scene.image)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK", "LA", "1", "F"])
def test_image_modes_are_converted(toy, scene, mode, unchanged):
    image = scene.image.convert(mode) if mode != "I;16" else \
        Image.fromarray(np.asarray(scene.image.convert("L"), dtype=np.uint16) * 257)  # PIL picks I;16
    assert image.mode == mode
    converted = load_image(image)
    assert converted.mode == "RGB" and converted.size == scene.image.size
    result = mdetr_agf.predict(toy, image, scene.caption, threshold=0.0)
    assert result.detections and all(np.isfinite(d.box).all() for d in result.detections)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize("size", [(1, 1), (3000, 40), (40, 3000), (2500, 2500)])
def test_tiny_and_huge_images(toy, scene, size):
    image = scene.image.resize(size)
    tensor, original = prepare(image)
    assert original == size and tuple(tensor.shape[-2:]) == resized_shape(*size)  # MDETR's 800/1333 rule
    assert min(tensor.shape[-2:]) >= 1 and max(tensor.shape[-2:]) <= 1333 * 1.05  # (it rounds the short side)
    result = mdetr_agf.predict(toy, image, scene.caption, threshold=0.0)
    x0, y0, x1, y1 = result.detections[0].box
    assert np.isfinite([x0, y0, x1, y1]).all()
    expl = mdetr_agf.explain(toy, image, scene.caption, method="grad_x_input")
    assert tuple(expl.image.shape) == (size[1], size[0])


@pytest.mark.parametrize("caption, error", [
    ("", InputError), ("   \n", InputError), (None, InputTypeError), (3.5, InputTypeError),
    (["a list"], InputTypeError), ("circle " * 300, InputError)])
def test_bad_captions(toy, scene, caption, error, unchanged):
    for call in (lambda: mdetr_agf.predict(toy, scene.image, caption),
                 lambda: mdetr_agf.explain(toy, scene.image, caption)):
        with pytest.raises(error) as info:
            call()
        assert "caption" in str(info.value)


@pytest.mark.parametrize("tensor, error, words", [
    (torch.full((3, 32, 32), float("nan")), InputError, "NaN"),
    (torch.full((3, 32, 32), float("inf")), InputError, "infinite"),
    (torch.zeros(32, 32), InputError, "3×H×W"),
    (torch.zeros(1, 3, 32, 32), InputError, "3×H×W"),
    (torch.zeros(3, 32, 32, dtype=torch.uint8), InputTypeError, "floating point")])
def test_bad_tensors(toy, scene, tensor, error, words, unchanged):
    for call in (lambda: mdetr_agf.predict(toy, tensor, scene.caption),
                 lambda: mdetr_agf.explain(toy, tensor, scene.caption)):
        with pytest.raises(error, match=words):
            call()


def test_bad_image_sources(toy, scene, tmp_path, unchanged):
    with pytest.raises(FileMissingError, match="no image file"):
        mdetr_agf.predict(toy, tmp_path / "missing.png", scene.caption)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(InputError, match="not an image"):
        mdetr_agf.predict(toy, not_image, scene.caption)
    with pytest.raises(InputTypeError, match="PIL image, a path, a URL"):
        mdetr_agf.predict(toy, 12345, scene.caption)


def test_unreachable_and_stalled_urls(toy, scene, monkeypatch, unchanged):
    monkeypatch.setenv("MDETR_AGF_URL_TIMEOUT", "1")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(DownloadError, match="could not fetch image"):
        mdetr_agf.predict(toy, f"http://127.0.0.1:{closed}/cat.jpg", scene.caption)

    release = threading.Event()

    class Stall(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            release.wait(5)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stall)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DownloadError, match="timeout 1 s"):
            mdetr_agf.predict(toy, f"http://127.0.0.1:{server.server_port}/cat.jpg", scene.caption)
    finally:
        release.set()
        server.shutdown()


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownNameError) as info:
        mdetr_agf.load_model("mdetr_resnet50")
    assert "mdetr_resnet101" in str(info.value) and "toy" in str(info.value)


def test_unknown_method_lists_valid_methods(toy, scene, unchanged):
    with pytest.raises(UnknownNameError) as info:
        mdetr_agf.explain(toy, scene.image, scene.caption, method="lime")
    assert all(m in str(info.value) for m in ("agf", "gae", "rollout", "gradcam"))


@pytest.mark.parametrize("kwargs, error, words", [
    ({"query": 99}, UnknownNameError, "query 99 is out of range"),
    ({"query": -1}, UnknownNameError, "out of range"),
    ({"query": 1.5}, InputTypeError, "query must be an int"),
    ({"tokens": [500]}, UnknownNameError, "token position 500"),
    ({"tokens": [-2]}, UnknownNameError, "out of range"),
    ({"tokens": []}, InputError, "empty"),
    ({"phrase": "purple elephant"}, UnknownNameError, "purple elephant"),
])
def test_bad_targets(toy, scene, kwargs, error, words, unchanged):
    with pytest.raises(error, match=words):
        mdetr_agf.explain(toy, scene.image, scene.caption, **kwargs)


def test_cli_reports_errors_without_traceback(capsys, tmp_path):
    assert cli.main(["detect", str(tmp_path / "missing.png"), "a cat", "--model", "toy"]) == 2
    assert "no image file" in capsys.readouterr().err
    assert cli.main(["explain", str(tmp_path / "missing.png"), "a cat", "--model", "nope"]) == 2
    assert "known names: " in capsys.readouterr().err


def test_every_error_is_ours_and_builtin_typed():
    for cls in (InputError, InputTypeError, UnknownNameError, DownloadError, FileMissingError):
        assert issubclass(cls, MdetrAgfError) and issubclass(cls, TYPED)


# ---------------------------------------------------------------- one input rule for every door


def wide(scene, width=320):
    """The scene (160 × 160) on the left of a ``width`` × 160 canvas of its background's colour."""
    pixels = np.asarray(scene.image)
    fill = np.broadcast_to(np.median(pixels.reshape(-1, 3), 0).astype(np.uint8), (160, width - 160, 3))
    return Image.fromarray(np.concatenate([pixels, fill], 1))


def test_predict_explain_and_evaluate_give_the_model_one_input(toy, scene):
    """A 320 × 160 image reaches the toy (trained at 160 px) as one tensor whichever door it takes:
    the shorter side at 160, the longer capped at 160 · 1333 / 800 = 267 px (so 134 × 268)."""
    from mdetr_agf.evaluate import empty_scores, scene_phrases, score_caption
    from mdetr_agf.inputs import input_scale, model_input

    image = wide(scene)
    assert image.size == (320, 160) and input_scale(toy) == (160, 267)
    expected = resized_shape(320, 160, 160, 267)
    assert expected == (134, 268)
    seen = {}

    def record(module, args, kwargs):
        images = kwargs["images"]
        shapes = {tuple(im.shape[-2:]) for im in images}  # a list of 3×h×w or an N×3×h×w batch
        seen.setdefault(door, set()).update(shapes)

    hook = toy.register_forward_pre_hook(record, with_kwargs=True)
    try:
        door = "predict"
        mdetr_agf.predict(toy, image, scene.caption)
        door = "explain"
        explanation = mdetr_agf.explain(toy, image, scene.caption, method="agf")
        door = "evaluate"
        phrases = [{**p, "mask": np.pad(p["mask"], ((0, 0), (0, 160))),
                    "other": None if p["other"] is None else np.pad(p["other"], ((0, 0), (0, 160)))}
                   for p in scene_phrases(scene)]
        score_caption(toy, image, scene.caption, phrases, ["raw_attention"], empty_scores(["raw_attention"]))
    finally:
        hook.remove()
    assert seen == {"predict": {expected}, "explain": {expected}, "evaluate": {expected}}
    assert tuple(model_input(toy, image)[0].shape) == (3, *expected)
    assert tuple(explanation.input_image.shape[-2:]) == expected and tuple(explanation.image.shape) == (160, 320)


def test_a_model_left_in_training_mode_is_explained_as_in_eval_mode(toy, scene):
    """Dropout must not choose the default target nor touch the map: explain runs in eval mode
    from its first forward on, and gives every module its own train flag back."""
    import copy

    from mdetr_agf.inputs import model_input

    training = copy.deepcopy(toy).train()
    training.backbone.eval()  # a mixed set-up: must come back mixed
    before = [m.training for m in training.modules()]
    pixels, _ = model_input(toy, scene.image)

    def top_query(model):
        with torch.no_grad():
            torch.manual_seed(0)
            return int((1 - model(images=[pixels], text=[scene.caption])["pred_logits"][0].softmax(-1)[:, -1]).argmax())

    assert top_query(training) != top_query(toy)  # dropout is active and would pick another query
    reference = mdetr_agf.explain(toy, scene.image, scene.caption, method="agf")
    torch.manual_seed(0)
    got = mdetr_agf.explain(training, scene.image, scene.caption, method="agf")
    assert got.target == reference.target
    assert torch.equal(got.image, reference.image) and torch.equal(got.tokens, reference.tokens)
    assert [m.training for m in training.modules()] == before
