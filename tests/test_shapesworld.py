"""ShapesWorld: determinism, ground truth consistent with the pixels, vocabulary coverage."""
import collections

import numpy as np
import pytest

from mdetr_agf.errors import InputError, InputTypeError
from mdetr_agf.shapesworld import (COLOURS, SHAPES, SIZES, Obj, Phrase, Scene, make_scene,
                                   make_scenes, vocabulary)


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(0, 200)


def _matches(obj, words):
    """Does a phrase's words ("the small red circle") describe obj?"""
    return all(w in ("the", "a") or w in (obj.shape, obj.colour, obj.size) for w in words)


def test_same_seed_same_scene():
    a, b = make_scene(1234), make_scene(1234)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.caption == b.caption and a.phrases == b.phrases
    assert len(a.objects) == len(b.objects)
    for oa, ob in zip(a.objects, b.objects):
        assert (oa.shape, oa.colour, oa.size, oa.box_xyxy) == (ob.shape, ob.colour, ob.size, ob.box_xyxy)
        assert np.array_equal(oa.mask, ob.mask)


def test_different_seeds_differ():
    images = [np.asarray(make_scene(s).image) for s in range(10)]
    for i in range(10):
        for j in range(i + 1, 10):
            assert not np.array_equal(images[i], images[j])
    assert len({make_scene(s).caption for s in range(20)}) > 5


def test_make_scenes_is_make_scene_of_consecutive_seeds():
    batch = make_scenes(7, 3)
    assert [s.caption for s in batch] == [make_scene(7 + i).caption for i in range(3)]
    assert make_scenes(0, 0) == []


def test_image_format_and_size():
    scene = make_scene(3)
    assert isinstance(scene, Scene) and scene.image.mode == "RGB" and scene.image.size == (160, 160)
    assert np.asarray(scene.image).dtype == np.uint8
    small = make_scene(3, size=128)
    assert small.image.size == (128, 128)
    assert all(o.mask.shape == (128, 128) for o in small.objects)


def test_ground_truth_matches_pixels(scenes):
    for scene in scenes:
        pixels = np.asarray(scene.image).astype(int)
        assert 1 <= len(scene.objects) <= 4
        union = np.zeros(pixels.shape[:2], dtype=int)
        for obj in scene.objects:
            assert isinstance(obj, Obj) and obj.mask.dtype == bool and obj.mask.shape == pixels.shape[:2]
            assert obj.mask.sum() > 10
            # mask pixels have the object's colour
            assert np.abs(pixels[obj.mask] - np.array(COLOURS[obj.colour])).max() <= 2
            # the box is the tight box of the mask, in pixel edges
            rows, cols = np.nonzero(obj.mask)
            assert obj.box_xyxy == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert all(isinstance(v, float) for v in obj.box_xyxy)
            # the object stands out from the background ring around it
            ring = np.zeros_like(obj.mask)
            x0, y0, x1, y1 = (int(v) for v in obj.box_xyxy)
            ring[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = True
            ring[obj.mask] = False
            for other in scene.objects:
                ring[other.mask] = False
            if ring.any():
                assert np.abs(pixels[ring].mean(0) - COLOURS[obj.colour]).max() > 40
            union += obj.mask
        assert union.max() <= 1, "visible masks of distinct objects overlap"
        # distinct attribute triples, so every object can be described uniquely
        assert len({(o.shape, o.colour, o.size) for o in scene.objects}) == len(scene.objects)


def test_phrases_index_caption_and_refer_uniquely(scenes):
    for scene in scenes:
        assert len(scene.phrases) >= 1
        for phrase in scene.phrases:
            assert isinstance(phrase, Phrase)
            start, end = phrase.char_span
            assert scene.caption[start:end] == phrase.text
            assert 0 <= phrase.object_index < len(scene.objects)
            words = phrase.text.split()
            referents = [i for i, o in enumerate(scene.objects) if _matches(o, words)]
            assert referents == [phrase.object_index], (scene.caption, phrase)


def test_spatial_relations_hold(scenes):
    checked = 0
    for scene in scenes:
        for relation in ("left of", "right of", "above", "below"):
            if f" {relation} " in scene.caption:
                a, b = (np.argwhere(scene.objects[p.object_index].mask).mean(0) for p in scene.phrases)
                axis, sign = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}[relation]
                assert sign * (a[axis] - b[axis]) > 0, scene.caption
                checked += 1
    assert checked > 10


def test_distribution_covers_vocabulary(scenes):
    counts = collections.Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3, 4}
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.size for o in objects} == set(SIZES)
    assert 5 <= len(COLOURS) <= 6 and len(SHAPES) >= 3
    vocab = vocabulary()
    used = {w for s in scenes for w in s.caption.split()}
    assert used <= set(vocab)
    assert used == set(vocab), f"never used: {set(vocab) - used}"
    assert any(len(s.phrases) == 2 for s in scenes) and any(len(s.phrases) == 1 for s in scenes)


def test_a_shape_selection_draws_only_those_shapes_and_leaves_captions_exact():
    for seed in range(40):
        scene = make_scene(seed, shapes=("circle", "star"))
        assert {o.shape for o in scene.objects} <= {"circle", "star"}
        for phrase in scene.phrases:
            referents = [i for i, o in enumerate(scene.objects) if _matches(o, phrase.text.split())]
            assert referents == [phrase.object_index], (scene.caption, phrase)
    one = [make_scene(seed, shapes=("square",)) for seed in range(20)]
    assert all(o.shape == "square" for s in one for o in s.objects)
    assert any(len(s.objects) > 1 for s in one)  # several squares, told apart by colour and size
    assert make_scene(5, shapes=SHAPES).caption == make_scene(5).caption
    for bad in ((), ("hexagon",)):
        with pytest.raises(InputError):
            make_scene(1, shapes=bad)


@pytest.mark.parametrize("seed, size, error", [
    (-1, 160, InputError), ("1", 160, InputTypeError), (1.0, 160, InputTypeError),
    (1, 10, InputError), (1, 160.0, InputError),
])
def test_bad_arguments_refused(seed, size, error):
    with pytest.raises(error):
        make_scene(seed, size=size)
