"""Training the toy MDETR: matcher, losses, positive maps, a short run, and the shipped model."""
import dataclasses
import math

import pytest
import torch

from torchvision.ops import box_convert, box_iou

from mdetr_agf import predict
from mdetr_agf.errors import InputError, ResumeError
from mdetr_agf.models.build import build_model
from mdetr_agf.shapesworld import COLOURS, SHAPES, SIZES, make_scene
from mdetr_agf.text import char_span_to_tokens, tokenize
from mdetr_agf.training import (EVAL_SEED_START, TRAIN_SEEDS, VALIDATION_SEED_START, HungarianMatcher, SetCriterion,
                                TrainConfig, accuracy_iou50, caption_variants, contrast_caption, forward_all_layers,
                                init_weights, make_batch, phrase_ious, positive_map, pretrain_text_encoder,
                                toy_config, toy_tokenizer, train, training_scene)

HELD_OUT = range(EVAL_SEED_START, EVAL_SEED_START + 1000)


@pytest.fixture(scope="module")
def tokenizer():
    return toy_tokenizer()


# ---------------------------------------------------------------- box losses


def test_box_losses_on_known_boxes():
    gold = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.1, 0.1]])
    pred = torch.tensor([[[0.25, 0.25, 0.1, 0.1], [0.0, 0.0, 0.0, 0.0], [0.55, 0.5, 0.2, 0.2]]])
    indices = [(torch.tensor([0, 2]), torch.tensor([1, 0]))]
    l1, giou = SetCriterion().loss_boxes({"pred_boxes": pred}, [{"boxes": gold}], indices, num_boxes=2)
    assert l1 == pytest.approx(0.05 / 2)  # query 0 is exact; query 2 is off by 0.05 in cx
    # query 2 vs target 0: two 0.2×0.2 boxes shifted by 0.05: inter 0.15·0.2, union 0.25·0.2 = hull
    assert giou == pytest.approx((1 - 0.15 / 0.25) / 2)


# ---------------------------------------------------------------- matcher


def _one_hot_logits(rows, width=256, high=10.0):
    logits = torch.full((len(rows), width), -high)
    for q, tokens in enumerate(rows):
        logits[q, tokens] = high
    return logits


def test_matcher_finds_the_known_assignment():
    target_boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2]])
    target_map = positive_map([[1, 2], [4, 5, 6]])
    # query 0: target 1's tokens and box; query 1: nothing; query 2: target 0's tokens and box
    logits = _one_hot_logits([[4, 5, 6], [255], [1, 2]])[None]
    boxes = torch.tensor([[[0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.5, 0.5], [0.21, 0.2, 0.1, 0.1]]])
    (rows, cols), = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes},
                                       [{"boxes": target_boxes}], target_map)
    assert rows.tolist() == [0, 2] and cols.tolist() == [1, 0]


def test_matcher_cost_weights_and_terms():
    matcher = HungarianMatcher()
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (1, 5, 2)  # MDETR's set_cost_*
    logits = torch.zeros(1, 256)  # uniform softmax: 1/256 on every position
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    cost = matcher.cost_matrix(logits, box, box, positive_map([[1, 2]]))
    assert cost.item() == pytest.approx(-1 / 256 + 0 + 2 * -1.0, abs=1e-6)


def test_matcher_lets_the_token_cost_decide_between_equal_boxes():
    # two queries with the same box; the one whose tokens match target 0 must get target 0
    box = torch.tensor([0.5, 0.5, 0.2, 0.2])
    logits = _one_hot_logits([[7], [3]])[None]
    (rows, cols), = HungarianMatcher()({"pred_logits": logits, "pred_boxes": box.expand(1, 2, 4)},
                                       [{"boxes": torch.stack([box, box])}], positive_map([[3], [7]]))
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


# ---------------------------------------------------------------- labels and contrastive losses


def test_soft_token_loss_follows_the_positive_map_and_eos_coef():
    target_map = positive_map([[1, 2]])
    logits = torch.zeros(1, 3, 256)
    indices = [(torch.tensor([1]), torch.tensor([0]))]
    loss = SetCriterion(eos_coef=0.1).loss_labels({"pred_logits": logits}, [{"boxes": torch.zeros(1, 4)}],
                                                  target_map, indices, num_boxes=1)
    # uniform prediction: −log(1/256) per query; the matched one weighs 1, the two others 0.1
    assert loss.item() == pytest.approx(math.log(256) * (1 + 2 * 0.1), rel=1e-5)


def test_contrastive_align_rewards_aligned_embeddings():
    tokens = [[1, 2]]
    criterion = SetCriterion()
    text = torch.nn.functional.normalize(torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    aligned = torch.stack([text[0, 3], text[0, 1]])[None]  # query 1 (matched) points at token 1
    misaligned = torch.stack([text[0, 1], text[0, 4]])[None]
    indices = [(torch.tensor([1]), torch.tensor([0]))]
    targets = [{"boxes": torch.zeros(1, 4), "tokens": tokens}]
    mask = torch.ones(1, 5, dtype=torch.long)
    good = criterion.loss_contrastive_align({"proj_queries": aligned, "proj_tokens": text}, targets, indices, 1, mask)
    bad = criterion.loss_contrastive_align({"proj_queries": misaligned, "proj_tokens": text}, targets, indices, 1,
                                           mask)
    assert good < bad


def test_attribute_loss_asks_each_matched_query_for_its_objects_attributes():
    """The toy's auxiliary loss: the state of the query matched to target j must name target j's
    colour, shape and size; states that name them give a near-zero loss, swapped states a large one."""
    sizes = (len(COLOURS), len(SHAPES), len(SIZES))
    head = torch.nn.Linear(sum(sizes), sum(sizes), bias=False)
    torch.nn.init.eye_(head.weight)
    head.weight.data *= 30
    attributes = torch.tensor([[0, 1, 0], [5, 4, 1]])

    def state(colour, shape, size):
        return torch.nn.functional.one_hot(torch.tensor([colour, sizes[0] + shape, sizes[0] + sizes[1] + size]),
                                           sum(sizes)).sum(0).float()

    named = torch.stack([state(*attributes[1]), torch.zeros(sum(sizes)), state(*attributes[0])])[None]
    swapped = named[:, [2, 1, 0]]
    indices = [(torch.tensor([0, 2]), torch.tensor([1, 0]))]  # query 0 ↔ target 1, query 2 ↔ target 0
    targets = [{"boxes": torch.zeros(2, 4), "attributes": attributes}]
    criterion = SetCriterion(attribute_head=head)
    good = criterion.loss_attributes({"hidden_states": named}, targets, indices, num_boxes=2)
    bad = criterion.loss_attributes({"hidden_states": swapped}, targets, indices, num_boxes=2)
    assert good.item() < 1e-3 < 10 < bad.item()


def test_batches_carry_each_phrases_attributes(tokenizer):
    scenes = [make_scene(s) for s in range(6)]
    for scene, target in zip(scenes, make_batch(scenes, tokenizer).targets):
        expected = [[list(COLOURS).index(o.colour), SHAPES.index(o.shape), list(SIZES).index(o.size)]
                    for o in (scene.objects[p.object_index] for p in scene.phrases)]
        assert target["attributes"].tolist() == expected


# ---------------------------------------------------------------- positive maps


@pytest.mark.parametrize("seed", [0, 7, 12, 1234])
def test_positive_maps_line_up_with_phrase_tokens(tokenizer, seed):
    scene = make_scene(seed)
    batch = make_batch([scene], tokenizer)
    assert batch.positive_map.shape == (len(scene.phrases), 256)
    assert torch.allclose(batch.positive_map.sum(-1), torch.ones(len(scene.phrases)))
    ids = batch.text["input_ids"][0]
    for row, phrase in zip(batch.positive_map, scene.phrases):
        positions = torch.nonzero(row).flatten().tolist()
        assert positions == batch.targets[0]["tokens"][scene.phrases.index(phrase)]
        assert tokenizer.decode(ids[positions]).strip() == phrase.text
        assert torch.allclose(row[positions], torch.full((len(positions),), 1 / len(positions)))
        assert row[255] == 0  # never "no object"
    width = scene.image.size[0]
    for box, phrase in zip(batch.targets[0]["boxes"], scene.phrases):
        gold = torch.tensor(scene.objects[phrase.object_index].box_xyxy) / width
        assert torch.allclose(box_convert(box, "cxcywh", "xyxy"), gold, atol=1e-6)


def test_positive_map_refuses_empty_targets():
    with pytest.raises(ValueError):
        positive_map([[]])


def test_caption_variants_keep_the_image_and_have_exact_spans():
    scene = make_scene(3)
    variants = caption_variants(scene, 3, 6)
    assert variants[0] is scene and len({v.caption for v in variants}) > 1
    for v in variants:
        assert v.image is scene.image and v.objects is scene.objects
        for p in v.phrases:
            assert v.caption[p.char_span[0]:p.char_span[1]] == p.text
    assert [v.caption for v in caption_variants(scene, 3, 6)] == [v.caption for v in variants]  # seeded


def test_all_objects_captions_name_every_object_once():
    for seed in range(20):
        scene = make_scene(seed)
        last = caption_variants(scene, seed, 3, all_objects=1)[-1]
        assert sorted(p.object_index for p in last.phrases) == list(range(len(scene.objects)))
        for p in last.phrases:
            o = scene.objects[p.object_index]
            assert last.caption[p.char_span[0]:p.char_span[1]] == p.text
            assert p.text.split()[1:] == [o.size, o.colour, o.shape]


def test_contrast_captions_refer_to_objects_whose_shape_repeats():
    import numpy as np

    named = 0
    for seed in range(60):
        scene = make_scene(seed)
        caption, phrases = contrast_caption(np.random.Generator(np.random.PCG64(seed)), scene.objects, 160)
        shapes = [o.shape for o in scene.objects]
        for p in phrases:
            assert caption[p.char_span[0]:p.char_span[1]] == p.text
            if len(set(shapes)) < len(shapes):  # a shape repeats: only such objects are named
                assert shapes.count(shapes[p.object_index]) > 1
                assert set(p.text.split()[1:]) & {scene.objects[p.object_index].colour,
                                                  scene.objects[p.object_index].size}
                named += 1
        if len(phrases) == 2 and len(set(shapes)) < len(shapes):
            a, b = (scene.objects[p.object_index] for p in phrases)
            assert a.shape == b.shape
    assert named > 10
    variants = caption_variants(make_scene(8), 8, 4, all_objects=1, contrast=2)
    assert [v.caption for v in variants] == [v.caption for v in caption_variants(make_scene(8), 8, 4, 1, 2)]


def test_similar_training_scenes_draw_from_one_or_two_shapes():
    assert all(training_scene(s).caption == make_scene(s).caption for s in range(10))  # similar=0: the world
    similar = [training_scene(s, 1.0) for s in range(40)]
    assert all(len({o.shape for o in scene.objects}) <= 2 for scene in similar)
    assert sum(len({o.shape for o in scene.objects}) < len(scene.objects) for scene in similar) > 15
    half = [training_scene(s, 0.5).caption == make_scene(s).caption for s in range(200)]
    assert 0.35 < sum(half) / 200 < 0.75  # about half the seeds keep the world's scene (some coincide)
    assert training_scene(17, 0.5).caption == training_scene(17, 0.5).caption


def test_one_backbone_pass_per_image_gives_the_same_outputs(tokenizer):
    torch.manual_seed(0)
    model = init_weights(build_model(toy_config(len(tokenizer)))).eval()
    scenes = [v for s in (3, 5) for v in caption_variants(make_scene(s), s, 3)]
    batch = make_batch(scenes, tokenizer, repeats=3)
    assert batch.images.shape[0] == 2 and batch.text["input_ids"].shape[0] == 6
    with torch.no_grad():
        shared = forward_all_layers(model, batch.images, batch.text, repeats=3)
        separate = forward_all_layers(model, batch.images.repeat_interleave(3, 0), batch.text)
        plain = model(batch.images.repeat_interleave(3, 0), batch.text)
    for key in ("pred_logits", "pred_boxes", "proj_queries", "proj_tokens"):
        assert torch.allclose(shared[-1][key], separate[-1][key], atol=1e-5)
        assert torch.allclose(separate[-1][key], plain[key], atol=1e-6)
    assert len(shared) == 2  # one set of outputs per decoder layer


# ---------------------------------------------------------------- training


def test_seed_ranges_are_disjoint():
    assert TRAIN_SEEDS.stop <= VALIDATION_SEED_START < EVAL_SEED_START
    assert HELD_OUT.start >= EVAL_SEED_START


def test_a_few_steps_make_the_loss_fall_and_are_deterministic(tokenizer):
    config = TrainConfig(steps=25, seed=0, batch_size=4, lr=1e-3, warmup=2, scene_seeds=range(4))
    run = train(config, tokenizer=tokenizer, progress=False)
    first, last = run.losses[0], sum(run.losses[-5:]) / 5
    assert all(math.isfinite(v) for v in run.losses)
    assert last < 0.8 * first, run.losses
    # the same options give the same losses, bit for bit (a shorter run shares the first steps:
    # the schedule differs only after the two warm-up steps, and loss k is taken before update k)
    again = train(dataclasses.replace(config, steps=3), tokenizer=tokenizer, progress=False)
    assert again.losses == run.losses[:3]
    assert run.options == config.as_dict() and run.options["enc_layers"] == 2


def test_text_lr_scale_zero_holds_the_text_encoder_fixed(tokenizer):
    """The shipped model's recipe: the masked-LM pre-trained text encoder is not changed by
    detection training (its word identities stay apart), everything else trains, and the model
    comes back with every parameter trainable again."""
    torch.manual_seed(0)
    model = init_weights(build_model(toy_config(len(tokenizer))))
    before = {n: p.clone() for n, p in model.named_parameters()}
    config = TrainConfig(steps=3, seed=0, batch_size=2, warmup=1, scene_seeds=range(2), text_lr_scale=0.0)
    run = train(config, tokenizer=tokenizer, model=model, progress=False)
    after = dict(run.model.named_parameters())
    text = [n for n in after if n.startswith("transformer.text_encoder.")]
    assert text and all(torch.equal(after[n], before[n]) for n in text)
    assert not torch.equal(after["class_embed.weight"], before["class_embed.weight"])
    assert all(p.requires_grad for p in after.values())


def test_config_refuses_what_it_cannot_run(tokenizer):
    with pytest.raises(InputError, match="batch_size 3 must be a multiple of the 2 training processes"):
        TrainConfig(batch_size=3, processes=2)
    with pytest.raises(InputError, match="steps must be an int >= 1"):
        TrainConfig(steps=0)
    with pytest.raises(InputError, match="scene_seeds is empty"):
        TrainConfig(scene_seeds=[])
    with pytest.raises(InputError, match="torchrun --nproc_per_node=2, or set processes=1"):
        train(TrainConfig(steps=1, batch_size=2, processes=2), tokenizer=tokenizer, progress=False)
    model = build_model(toy_config(len(tokenizer)))  # 2 + 2 layers
    with pytest.raises(InputError, match="pass a config that describes the model"):
        train(TrainConfig(steps=1, enc_layers=3), model=model, tokenizer=tokenizer, progress=False)
    config = TrainConfig(scene_seeds=[5, 3])
    assert config.scene_seeds == (5, 3) and config.as_dict()["scene_seeds"] == [5, 3]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0


def test_text_pretraining_learns_the_words_and_keeps_the_parameters(tokenizer):
    torch.manual_seed(0)
    model = init_weights(build_model(toy_config(len(tokenizer))))
    names = {n: p.shape for n, p in model.state_dict().items()}
    frozen = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("transformer.text_encoder.")}
    losses = pretrain_text_encoder(model, tokenizer, 80, seed=0)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), losses
    assert {n: p.shape for n, p in model.state_dict().items()} == names  # the head is not kept
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_an_interrupted_run_resumes_from_its_checkpoint(tokenizer, tmp_path):
    config = TrainConfig(steps=5, seed=0, batch_size=2, lr=1e-3, warmup=2, scene_seeds=range(6),
                         attribute_loss=1.0)  # its head is saved and resumed too
    kwargs = dict(tokenizer=tokenizer, progress=False, checkpoint_every=2)
    whole = train(config, **kwargs)

    class Stop(Exception):
        pass

    def stop(step, model):
        raise Stop

    state = tmp_path / "state.pt"
    with pytest.raises(Stop):
        train(config, checkpoint=str(state), callback=stop, callback_every=2, **kwargs)
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 2 and saved["config"] == config.as_dict()
    resumed = train(config, checkpoint=str(state), **kwargs)  # the same options: it continues
    assert resumed.losses[:2] == whole.losses[:2]  # the two steps done before the stop, read back
    assert torch.allclose(torch.tensor(resumed.losses), torch.tensor(whole.losses), rtol=1e-6, atol=0)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize("change, named", [({"enc_layers": 3}, "enc_layers: 2 there, 3 here"),
                                           ({"steps": 6}, "steps: 5 there, 6 here"),
                                           ({"attribute_loss": 0.0}, "attribute_loss: 1.0 there, 0.0 here"),
                                           ({"channels_last": False, "threads": 1},
                                            "channels_last: True there, False here; threads: None there, 1 here")])
def test_a_checkpoint_resumes_only_with_the_options_it_was_written_with(tokenizer, tmp_path, change, named):
    """The whole config is saved with the state and compared on resume: any field that differs
    is refused, by name, before a step is taken."""
    config = TrainConfig(steps=5, seed=0, batch_size=2, warmup=2, scene_seeds=range(4), attribute_loss=1.0)
    state = tmp_path / "state.pt"

    def stop(step, model):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, tokenizer=tokenizer, progress=False, checkpoint=str(state), checkpoint_every=1,
              callback=stop, callback_every=1)
    written = state.read_bytes()
    with pytest.raises(ResumeError, match=named) as refused:
        train(dataclasses.replace(config, **change), tokenizer=tokenizer, progress=False, checkpoint=str(state))
    assert "resume it with the options it was written with" in str(refused.value)
    assert state.read_bytes() == written  # refused before anything was trained or written


def test_a_checkpoint_without_options_is_refused(tokenizer, tmp_path):
    state = tmp_path / "old.pt"
    torch.save({"steps": 5, "step": 2, "model": {}, "losses": [1.0, 0.9]}, state)
    with pytest.raises(ResumeError, match="holds no training options"):
        train(TrainConfig(steps=5, batch_size=2, scene_seeds=range(2)), tokenizer=tokenizer, progress=False,
              checkpoint=str(state))


# ---------------------------------------------------------------- the shipped model


def test_toy_loads_offline_with_its_tokenizer_and_input_size(toy, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert toy.input_size == 160 and toy.num_queries == 8
    encoding = tokenize(toy.get_tokenizer(), ["the small red circle"])
    assert toy.get_tokenizer().convert_ids_to_tokens(encoding["input_ids"][0]) == [
        "<s>", "the", "Ġsmall", "Ġred", "Ġcircle", "</s>"]


def test_shipped_tokenizer_is_the_one_training_builds(toy, tokenizer):
    captions = [make_scene(s).caption for s in HELD_OUT[:20]]
    assert toy.get_tokenizer()(captions)["input_ids"] == tokenizer(captions)["input_ids"]
    assert len(toy.get_tokenizer()) == toy.config.text_config.vocab_size


def test_toy_predict_grounds_held_out_phrases(toy):
    """Through the public predict(): the best detection carrying a phrase's tokens is its object."""
    grounded = total = 0
    for seed in HELD_OUT[:20]:
        scene = make_scene(seed)
        result = predict(toy, scene.image, scene.caption)
        assert result.image_size == (160, 160)
        for phrase in scene.phrases:
            tokens = set(char_span_to_tokens(result.encoding, 0, *phrase.char_span))
            hits = [d for d in result.detections if tokens & set(d.tokens)]
            total += 1
            if hits:
                best = max(hits, key=lambda d: d.score)
                gold = torch.tensor([scene.objects[phrase.object_index].box_xyxy])
                grounded += box_iou(torch.tensor([best.box]), gold).item() >= 0.5
    # measured 30 of 33; one phrase of slack for another CPU's float rounding at a borderline IoU
    assert total == 33 and abs(grounded - 30) <= 1, f"{grounded}/{total} phrases grounded"


def test_toy_held_out_accuracy(toy):
    """Referring-expression accuracy@IoU0.5 on scenes never used for training or tuning."""
    # measured 287 of 293 phrases (0.9795; 97.82 % on 2,000 scenes); one phrase of slack as above
    assert accuracy_iou50(toy, HELD_OUT[:200]) == pytest.approx(287 / 293, abs=1.01 / 293)


def test_toy_tells_same_shape_objects_apart_by_colour(toy):
    """"the red circle" beside a circle of another colour: only colour tells them apart. Trained
    with MDETR's losses alone the toy grounds these at chance (0.61 here); the attribute loss
    teaches it colour (docs/evaluation.md). Pinned to the shipped model's count, so a model that
    loses it again is caught."""
    scenes, picked = [make_scene(s) for s in HELD_OUT[:400]], []
    for scene in scenes:
        shapes = [o.shape for o in scene.objects]
        keep = [p for p in scene.phrases if shapes.count(shapes[p.object_index]) > 1
                and scene.objects[p.object_index].colour in p.text.split()]
        if keep:
            picked.append(type(scene)(scene.image, scene.caption, scene.objects, keep))
    assert len(picked) > 40
    ious = [iou for k in range(0, len(picked), 64) for iou in phrase_ious(toy, picked[k: k + 64])]
    hits, total = sum(iou >= 0.5 for iou in ious), len(ious)
    assert total == 174 and abs(hits - 170) <= 1, f"{hits}/{total}"  # measured 170 / 174 = 0.977


def test_processes_option_starts_the_script_under_torchrun():
    """``scripts/train_toy.py --processes 2 ...`` is ``torchrun --nproc_per_node=2 scripts/train_toy.py ...``."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_toy.py"
    spec = importlib.util.spec_from_file_location("train_toy", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for argv in (["--processes", "2", "--steps", "3"], ["--steps", "3", "--processes=2"]):
        assert script.torchrun_command(2, argv) == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node=2", str(path), "--steps", "3"]
