"""explain() on MDETR: every method returns finite, image-sized, target-dependent maps, and the
model is left exactly as it was (outputs, hooks), also when an error is raised mid-way."""
import gc
import resource

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mdetr_agf
from mdetr_agf.attribution import METHODS, QueryTokenTarget
from mdetr_agf.attribution.core.engine import hooked
from mdetr_agf.shapesworld import make_scene

from conftest import scene_logits


@pytest.fixture(scope="module")
def scene():
    return make_scene(1_000_002)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_contract(toy, scene, method):
    before, hooks = scene_logits(toy, scene), len(hooked(toy))
    e = mdetr_agf.explain(toy, scene.image, scene.caption, method=method)
    n_tokens = len(toy.get_tokenizer()(scene.caption)["input_ids"])
    assert tuple(e.image.shape) == (scene.image.height, scene.image.width)
    assert e.tokens.shape == (n_tokens,) and len(e.token_strings) == n_tokens
    assert torch.isfinite(e.image).all() and torch.isfinite(e.tokens).all()
    if method == "gradcam":  # its ReLU may zero a whole map on a 5×5 grid; it is never negative
        assert (e.image >= 0).all()
    else:
        assert e.image.std() > 0, "constant map"
    again = mdetr_agf.explain(toy, scene.image, scene.caption, method=method)
    assert torch.equal(again.image, e.image) and torch.equal(again.tokens, e.tokens)  # deterministic
    assert torch.equal(scene_logits(toy, scene), before) and len(hooked(toy)) == hooks


@pytest.mark.parametrize("method", list(METHODS))
def test_batched_targets_equal_single_calls(toy, scene, method):
    targets = [QueryTokenTarget(0, (1, 2)), QueryTokenTarget(3, (2,))]
    batch = mdetr_agf.explain(toy, scene.image, scene.caption, target=targets, method=method)
    singles = [mdetr_agf.explain(toy, scene.image, scene.caption, target=t, method=method) for t in targets]
    for b, s in zip(batch, singles):
        torch.testing.assert_close(b.image, s.image, rtol=1e-4, atol=1e-6)
    if method != "gradcam":  # (Grad-CAM's ReLU may zero both maps)
        assert not torch.allclose(batch[0].image, batch[1].image), "another query should give another map"


def test_hooks_removed_when_a_target_fails(toy, scene):
    before, hooks = scene_logits(toy, scene), len(hooked(toy))

    class Broken:
        """Fails after the hooked forward, wherever a method reads it (score, query or heads)."""

        def __call__(self, out, score):
            raise RuntimeError("target failed on purpose")

        @property
        def query(self):
            raise RuntimeError("target failed on purpose")

        def heads(self, model):
            return ["class_embed"]

    for method in METHODS:
        with pytest.raises(RuntimeError, match="on purpose"):
            mdetr_agf.explain(toy, scene.image, scene.caption, target=Broken(), method=method)
        assert len(hooked(toy)) == hooks
    assert torch.equal(scene_logits(toy, scene), before)


def test_memory_stays_flat_over_100_explanations(toy, scene):
    def rss():
        gc.collect()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    for _ in range(10):
        mdetr_agf.explain(toy, scene.image, scene.caption)
    start = rss()
    for _ in range(100):
        mdetr_agf.explain(toy, scene.image, scene.caption)
    assert rss() - start < 50 * 1024, "peak RSS grew by more than 50 MiB over 100 explanations"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(8, 400), height=st.integers(8, 400), seed=st.integers(0, 10**6),
       method=st.sampled_from(sorted(METHODS)), query=st.integers(0, 7), data=st.data())
def test_property_any_size_any_target(toy, width, height, seed, method, query, data):
    scene = make_scene(seed)
    image = scene.image.resize((width, height))
    n = len(toy.get_tokenizer()(scene.caption)["input_ids"])
    tokens = data.draw(st.lists(st.integers(1, n - 2), min_size=1, max_size=3, unique=True))
    e = mdetr_agf.explain(toy, image, scene.caption, query=query, tokens=tokens, method=method)
    assert tuple(e.image.shape) == (height, width) and e.tokens.shape == (n,)
    assert torch.isfinite(e.image).all() and torch.isfinite(e.tokens).all()


@pytest.mark.parametrize("dataset", ["clevr", "gqa"])
def test_the_model_names_each_qa_heads_slot_and_output_layer(dataset):
    """``qa_slot`` is the decoder slot whose first-layer state each QA head reads, and
    ``qa_output_layer`` the layer whose output is the head's logits (what AGF starts from)."""
    from mdetr_agf.models.build import ModelConfig, build_model
    from mdetr_agf.models.mdetr import QA_HEADS
    from mdetr_agf.models.text_encoder import TextConfig

    torch.manual_seed(0)
    text = TextConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=40)
    model = build_model(ModelConfig(backbone="small_cnn", num_queries=5, qa_dataset=dataset, hidden_dim=32, nheads=4,
                                    enc_layers=1, dec_layers=2, dim_feedforward=64, text_config=text))
    states, outputs = [], {}
    handles = [model.transformer.decoder.register_forward_hook(lambda m, a, out: states.append(out))]
    for head in model.qa_heads():
        layer = model.get_submodule(model.qa_output_layer(head))
        assert isinstance(layer, torch.nn.Linear)
        handles.append(layer.register_forward_hook(lambda m, a, out, head=head: outputs.__setitem__(head, out)))
    ids = {"input_ids": torch.tensor([[0, 5, 6, 2]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        out = model(images=[torch.randn(3, 64, 96)], text=ids)
    for h in handles:
        h.remove()
    assert model.qa_heads() == [name.removeprefix("pred_answer_") for name, _, _ in QA_HEADS[dataset]]
    assert out["pred_logits"].shape[1] == 5
    first_layer = states[0][0]
    for head, (name, attr, _) in zip(model.qa_heads(), QA_HEADS[dataset]):
        slot = model.qa_slot(head)
        assert 5 <= slot < 5 + len(QA_HEADS[dataset])
        expected = getattr(model, attr)(first_layer[:, slot])
        assert torch.equal(out[name], expected.squeeze(-1) if name == "pred_answer_binary" else expected)
        assert torch.equal(outputs[head].reshape(out[name].shape), out[name])
    with pytest.raises(KeyError, match="no QA head 'colour'"):
        model.qa_slot("colour")
