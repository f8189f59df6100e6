"""The comparison methods are the methods their authors published.

``gae`` and ``rollout`` reproduce the outputs of Chefer et al.'s own ``ExplanationGenerator``
(``conformance/chefer``: two stand-in families, a plain and a padded caption, raw maps);
``gradcam`` equals pytorch-grad-cam's ``GradCAM`` and ``grad_x_input`` Captum's
``InputXGradient`` (and its layer form for the token and grid maps), on the toy model and on a
stand-in family, with the same target and score.
"""
import functools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import InputXGradient, LayerGradientXActivation
from pytorch_grad_cam import GradCAM
from torch import nn

import mdetr_agf
from mdetr_agf.errors import InputError, UnknownNameError
from mdetr_agf.attribution import QueryTokenTarget
from mdetr_agf.attribution.mdetr.methods import DEFAULT_SCORES, METHODS
from mdetr_agf.models.mdetr import core
from mdetr_agf.images import prepare
from mdetr_agf.models.build import FAMILIES, build_model
from mdetr_agf.shapesworld import make_scene

from conftest import conformance_path, stand_in_weights

CHEFER_FAMILIES = ["mdetr_resnet101", "mdetr_clevr"]
CASES = {"plain": "", "padded": "padded_"}


@functools.lru_cache(maxsize=2)
def stand_in(family):
    manifest = json.loads(conformance_path("mdetr", f"{family}.manifest.json").read_text())
    state = stand_in_weights().make_state_dict([(k, s) for k, s, _ in manifest])
    model = build_model(FAMILIES[family])
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("position_ids")})
    return model


def chefer_case(family, prefix):
    """(model, enlarged image, text, recorded targets, fixture arrays) of one case."""
    z = dict(np.load(conformance_path("chefer", f"{family}.npz")))
    image = F.interpolate(torch.from_numpy(z["image0"])[None], scale_factor=4, mode="bilinear",
                          align_corners=False)[0]
    text = {k: torch.from_numpy(z[prefix + k]) for k in ("input_ids", "attention_mask")}
    targets = [QueryTokenTarget(int(q), tuple(int(t) for t in ts if t >= 0))
               for q, ts in zip(z[prefix + "queries"], z[prefix + "token_sets"])]
    return stand_in(family), image, text, targets, {k.removeprefix(prefix): v for k, v in z.items()
                                                     if k.startswith(prefix)}


def assert_reproduces(mine, fixture, what):
    """The fixtures' tolerance, on raw maps: max|diff| <= 1e-3 * max|fixture| and Pearson r >= 0.9999."""
    mine, fixture = np.asarray(mine, np.float64).ravel(), np.asarray(fixture, np.float64).ravel()
    assert mine.shape == fixture.shape, what
    relative = np.abs(mine - fixture).max() / np.abs(fixture).max()
    r = np.corrcoef(mine, fixture)[0, 1]
    assert relative <= 1e-3 and r >= 0.9999, f"{what}: max|diff| = {relative:.2e} of max, r = {r:.7f}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", CHEFER_FAMILIES)
def test_gae_and_rollout_reproduce_chefer(family, case):
    model, image, text, targets, z = chefer_case(family, CASES[case])
    with torch.no_grad():  # the same forward first: the targets' logits as recorded
        out = model(images=image[None], text=text)
    logits = out["pred_logits"][0, [t.query for t in targets]].numpy()
    assert np.abs(logits - z["target_logits"]).max() <= 1e-4
    for method in ("gae", "rollout"):
        explanations = mdetr_agf.explain(model, image, text, target=targets, method=method)
        assert all(e.score == DEFAULT_SCORES[method] for e in explanations)
        for i, e in enumerate(explanations):
            assert_reproduces(e.grid, z[f"{method}_grid_{i}"], f"{family} {case} {method} grid {i}")
            assert_reproduces(e.tokens, z[f"{method}_tokens_{i}"], f"{family} {case} {method} tokens {i}")


def test_gae_with_another_score_is_another_map():
    """The fixtures were made with the raw logit; the softmax score must not pass for it."""
    model, image, text, targets, z = chefer_case("mdetr_clevr", "")
    e = mdetr_agf.explain(model, image, text, target=targets[0], method="gae", score="softmax")
    assert e.score == "softmax"
    with pytest.raises(AssertionError):
        assert_reproduces(e.grid, z["gae_grid_0"], "softmax score")


# ---------------------------------------------------------------- pytorch-grad-cam and Captum


class Logits(nn.Module):
    """The model as pytorch-grad-cam takes it: image batch in, class logits (N, Q, 256) out."""

    def __init__(self, model, text):
        super().__init__()
        self.model, self.text = model, text

    def forward(self, images):
        return self.model(images=images, text=self.text)["pred_logits"]


class GradCAMAtLayerSize(GradCAM):
    """pytorch-grad-cam's GradCAM, its map left at the layer's own size (it resizes to the input
    otherwise), to compare the grid and the token map where they are computed."""

    def get_target_width_height(self, input_tensor):
        return None


def minmax(a):
    a = np.asarray(a, np.float64)
    a = a - a.min()
    assert a.max() > 0, "a constant map compares nothing"
    return a / a.max()


def maxabs(a):
    a = np.asarray(a, np.float64)
    assert np.abs(a).max() > 0, "an all-zero map compares nothing"
    return a / np.abs(a).max()


def assert_same_map(mine, theirs, what):
    """<= 1e-4 on normalized maps and correlation >= 0.9999."""
    mine, theirs = np.ravel(mine), np.ravel(theirs)
    assert mine.shape == theirs.shape, what
    diff, r = np.abs(mine - theirs).max(), np.corrcoef(mine, theirs)[0, 1]
    assert diff <= 1e-4 and r >= 0.9999, f"{what}: max|diff| = {diff:.2e}, r = {r:.7f}"


def toy_case(toy):
    scene = make_scene(1_000_002)  # two objects: the target phrase is one of them
    pixels, _ = prepare(scene.image, size=toy.input_size)
    encoding = toy.get_tokenizer()([scene.caption], return_tensors="pt")
    text = {k: encoding[k] for k in ("input_ids", "attention_mask")}
    return toy, pixels, text, QueryTokenTarget(2, (7, 8, 9, 10)), core(toy).backbone[0].body[-1]


def stand_in_case():
    z = np.load(conformance_path("chefer", "mdetr_clevr.npz"))
    text = {k: torch.from_numpy(z[k]) for k in ("input_ids", "attention_mask")}  # no padding
    model = stand_in("mdetr_clevr")
    return model, torch.from_numpy(z["image0"]), text, QueryTokenTarget(int(z["queries"][0]), (7,)), \
        core(model).backbone[0].body.layer4


@pytest.fixture(params=["toy", "mdetr_clevr"])
def peer_case(request):
    return toy_case(request.getfixturevalue("toy")) if request.param == "toy" else stand_in_case()


def test_gradcam_equals_pytorch_grad_cam(peer_case):
    model, pixels, text, target, layer = peer_case
    assert int(text["attention_mask"].sum()) == text["attention_mask"].shape[1], "token maps: no padding"
    e = mdetr_agf.explain(model, pixels, text, target=target, method="gradcam")
    assert e.score == "logit"
    wrapped = Logits(model, text)
    logit = [lambda o: o[target.query, list(target.tokens)].sum()]  # the raw logit, per image
    theirs = GradCAM(wrapped, [layer])(pixels[None], targets=logit)[0]  # min-max scaled, resized
    assert_same_map(minmax(e.input_map), minmax(theirs), "pixels")
    theirs = GradCAMAtLayerSize(wrapped, [layer])(pixels[None], targets=logit)[0]
    assert_same_map(minmax(e.grid), minmax(theirs), "grid")
    embeddings = core(model).transformer.text_encoder.embeddings.word_embeddings
    as_map = GradCAMAtLayerSize(wrapped, [embeddings], reshape_transform=lambda t: t.transpose(1, 2)[..., None])
    assert_same_map(minmax(e.tokens), minmax(as_map(pixels[None], targets=logit)[0]), "tokens")


def test_grad_x_input_equals_captum(peer_case):
    model, pixels, text, target, _ = peer_case
    e = mdetr_agf.explain(model, pixels, text, target=target, method="grad_x_input")
    assert e.score == "logit"

    def score(images):  # the same target and score, one value per image
        return target(model(images=images, text=text), "logit")[None]

    x = pixels[None].clone().requires_grad_(True)
    theirs = InputXGradient(score).attribute(x).abs().sum(1)[0]
    assert_same_map(maxabs(e.input_map), maxabs(theirs.detach()), "pixels")
    assert torch.equal(e.input_map, theirs.detach())  # the same operations: the same bits
    detr = core(model)
    tokens = LayerGradientXActivation(score, detr.transformer.text_encoder.embeddings.word_embeddings)
    theirs = tokens.attribute(x).sum(-1)[0, : e.tokens.numel()].detach()
    assert_same_map(maxabs(e.tokens), maxabs(theirs), "tokens")
    theirs = LayerGradientXActivation(score, detr.input_proj).attribute(x).sum(1)[0].abs().detach()
    assert_same_map(maxabs(e.grid), maxabs(theirs), "grid")


# ---------------------------------------------------------------- the score is a stated choice


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_records_its_score(toy, method):
    scene = make_scene(1_000_002)
    e = mdetr_agf.explain(toy, scene.image, scene.caption, method=method)
    assert e.score == DEFAULT_SCORES[method]
    if DEFAULT_SCORES[method] is None:  # attention only: a score would be a false claim
        with pytest.raises(InputError, match="no score"):
            mdetr_agf.explain(toy, scene.image, scene.caption, method=method, score="logit")
        return
    maps = {}
    for score in ("logit", "softmax", "agf"):
        e = mdetr_agf.explain(toy, scene.image, scene.caption, method=method, score=score)
        assert e.score == score and torch.isfinite(e.image).all()
        maps[score] = e.image
    assert not torch.allclose(maps["logit"], maps["agf"]), "the score should change the map"
    with pytest.raises(UnknownNameError, match="logit, softmax, agf"):
        mdetr_agf.explain(toy, scene.image, scene.caption, method=method, score="probability")


def test_scores_are_what_their_names_say(toy):
    scene = make_scene(1_000_002)
    pixels, _ = prepare(scene.image, size=toy.input_size)
    with torch.no_grad():
        out = toy(images=pixels[None], text=[scene.caption])
    target = QueryTokenTarget(2, (7, 8))
    logits = out["pred_logits"][0, 2]
    torch.testing.assert_close(target(out, "logit"), logits[[7, 8]].sum())
    torch.testing.assert_close(target(out, "softmax"), logits.softmax(-1)[[7, 8]].sum())
    assert float(target(out, "agf")) != pytest.approx(float(target(out, "softmax")), rel=1e-3)


def test_evaluate_names_and_applies_the_score(toy, tmp_path):
    """``evaluate --score`` explains every method that takes a score with it, leaves the
    attention-only ones alone, and the JSON says which score each method used."""
    from mdetr_agf.cli import main

    runs = {}
    for name, extra in (("default", []), ("softmax", ["--score", "softmax"])):
        path = tmp_path / f"{name}.json"
        assert main(["evaluate", "--model", "toy", "--methods", "gradcam,raw_attention", "--n", "3",
                     "--seed", "3000000", "--json", str(path)] + extra) == 0
        runs[name] = json.loads(path.read_text())
    assert runs["default"]["target_scores"] == {"gradcam": "logit", "raw_attention": None}
    assert runs["softmax"]["target_scores"] == {"gradcam": "softmax", "raw_attention": None}
    assert runs["softmax"]["methods"]["raw_attention"] == runs["default"]["methods"]["raw_attention"]
    assert runs["softmax"]["methods"]["gradcam"] != runs["default"]["methods"]["gradcam"]
