"""predict(): MDETR's transform and post-processing, on a small model with a locally built tokenizer."""
import numpy as np
import pytest
import torch
from PIL import Image

from mdetr_agf import predict
from mdetr_agf.errors import InputError, InputTypeError
from mdetr_agf.images import prepare, resized_shape

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
    result = predict(small_model, image, caption, threshold=0.5)
    assert len(result.detections) == 5
    offsets = result.encoding["offset_mapping"][0].tolist()
    expected_span = (offsets[2][0], offsets[3][1])
    for d in result.detections:
        assert d.tokens == [2, 3]
        assert d.spans == [expected_span]
        assert d.phrase == caption[expected_span[0]:expected_span[1]] == "red"  # tokens "Ġre", "d"
        x0, y0, x1, y1 = d.box
        assert -80 <= x0 <= x1 <= 160 and -60 <= y0 <= y1 <= 120  # pixels of the 80×60 original


def test_threshold_filters(small_model):
    image = Image.new("RGB", (40, 30))
    assert predict(small_model, image, CAPTIONS[1], threshold=1.0).detections == []


@pytest.mark.parametrize("caption, error", [("", InputError), ("   ", InputError), (None, InputTypeError),
                                            (42, InputTypeError), ("word " * 300, InputError)])
def test_bad_captions_get_typed_errors(small_model, caption, error):
    with pytest.raises(error):
        predict(small_model, Image.new("RGB", (40, 30)), caption)
