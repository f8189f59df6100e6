"""predict(): MDETR's transform and post-processing, on a small model with a locally built tokenizer."""
import numpy as np
import pytest
import torch
from PIL import Image

from mdetr_agf import predict
from mdetr_agf.errors import InputError, InputTypeError
from mdetr_agf.images import prepare, resized_shape
from mdetr_agf.shapesworld import make_scene

from conftest import CAPTIONS


def test_resize_rule_matches_mdetr():
    assert resized_shape(640, 480) == (800, 1066)  # (h, w): shorter side to 800
    assert resized_shape(480, 640) == (1066, 800)
    assert resized_shape(3000, 600) == (267, 1335)  # longer side capped near 1333 (the original rounds so)
    assert resized_shape(1, 1) == (800, 800)
    h, w = resized_shape(10000, 1)
    assert h >= 1 and w >= 1333


def test_prepare_normalizes_and_keeps_original_size():
    image = Image.new("RGB", (64, 48), (124, 116, 104))  # ImageNet's mean colour
    tensor, size = prepare(image)
    assert size == (64, 48) and tuple(tensor.shape) == (3, 800, 1066)
    assert tensor.abs().max() < 0.02


def test_spans_line_up_with_caption(small_model):
    image = Image.fromarray((np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8))
    caption = CAPTIONS[0]
    with torch.no_grad():  # every query's box: (cx, cy, w, h) = (0.5, 0.25, 0.5, 0.3) of the image
        head = small_model.bbox_embed.layers[-1]
        head.weight.zero_()
        head.bias.copy_(torch.logit(torch.tensor([0.5, 0.25, 0.5, 0.3])))
    result = predict(small_model, image, caption, threshold=0.5)
    assert len(result.detections) == 5
    offsets = result.encoding["offset_mapping"][0].tolist()
    expected_span = (offsets[2][0], offsets[3][1])
    for d in result.detections:
        assert d.tokens == [2, 3]
        assert d.spans == [expected_span]
        assert d.phrase == caption[expected_span[0]:expected_span[1]] == "red"  # tokens "Ġre", "d"
        assert d.box == pytest.approx((20, 6, 60, 24), abs=1e-4)  # pixels of the 80×60 original


@pytest.mark.parametrize("size", [(320, 160), (160, 320)])
def test_toy_boxes_lie_in_a_non_square_image(toy, size):
    """The toy's boxes on a wide and on a tall image: inside the image, and its normalized boxes
    scaled by the image's own width and height (not swapped, not the square input's)."""
    from torchvision.ops import box_convert

    scene = make_scene(1_000_002)
    canvas = Image.new("RGB", size, tuple(int(v) for v in np.median(np.asarray(scene.image).reshape(-1, 3), 0)))
    canvas.paste(scene.image, (0, 0))
    result = predict(toy, canvas, scene.caption, threshold=0.5)
    assert result.image_size == size and len(result.detections) >= 2
    width, height = size
    normalized = box_convert(result.outputs["pred_boxes"][0], "cxcywh", "xyxy")
    for d in result.detections:
        x0, y0, x1, y1 = d.box
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, d.box
        assert d.box == pytest.approx(tuple((normalized[d.query] * torch.tensor([width, height] * 2)).tolist()))
        assert x1 <= 160 and y1 <= 160  # the scene's objects are all in its top-left 160 × 160


def test_threshold_filters(small_model):
    image = Image.new("RGB", (40, 30))
    assert predict(small_model, image, CAPTIONS[1], threshold=1.0).detections == []


@pytest.mark.parametrize("caption, error", [("", InputError), ("   ", InputError), (None, InputTypeError),
                                            (42, InputTypeError), ("word " * 300, InputError)])
def test_bad_captions_get_typed_errors(small_model, caption, error):
    with pytest.raises(error):
        predict(small_model, Image.new("RGB", (40, 30)), caption)


def test_grounding_picks_the_most_confident_query_grounding_the_tokens():
    """Query 0 grounds tokens 1-2 surely but is unsure it is an object; query 1 grounds token 2
    and is confident; query 2 puts the most mass on token 1 without passing the 0.1 threshold."""
    from mdetr_agf.grounding import TOKEN_THRESHOLD, best_query, grounded_tokens, most_mass_query, query_for_tokens

    probs = torch.full((3, 6), 1e-3)
    probs[0, [1, 2]], probs[0, -1] = 0.3, 0.4  # object score 0.6
    probs[1, 2], probs[1, -1] = 0.9, 0.05  # object score 0.95
    probs[2, 1], probs[2, 3], probs[2, -1] = 0.09, 0.5, 0.4
    logits = (probs / probs.sum(-1, keepdim=True)).log()
    assert TOKEN_THRESHOLD == 0.1
    assert grounded_tokens(logits[0], 4) == [1, 2] and grounded_tokens(logits[2], 4) == [3]
    assert query_for_tokens(logits, [1, 2], 4) == 1  # the confident one among those grounding any token
    assert query_for_tokens(logits, [1], 4) == 0  # only query 0 grounds token 1
    assert most_mass_query(logits, [1]) == 0 and most_mass_query(logits, [3]) == 2
    assert query_for_tokens(logits, [4], 4) == most_mass_query(logits, [4])  # nobody grounds it: the mass
    assert best_query([(0, 0.6, [1, 2]), (1, 0.95, [2])], [0]) is None
