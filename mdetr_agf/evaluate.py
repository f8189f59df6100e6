"""Do explanations point at the right thing? Metrics on scenes whose ground truth is exact.

For every phrase of a ShapesWorld scene the explainer is asked for the phrase's query and tokens
(a ``QueryTokenTarget``; the query: see below), and its map is scored against the referred
object's box and mask:

* ``pointing_game``: the map's maximum lies inside the object's box (1) or not (0);
* ``energy_in_box``: the share of the map's positive relevance inside the box;
* ``mask_iou``: IoU of the object's mask with the map's top-k pixels, k = the mask's area;
* ``deletion_auc``: the model's score for the phrase (softmax mass of the explained query on the
  phrase tokens, relative to the unperturbed score) as the most relevant pixels are replaced by
  the image mean, in ``STEPS`` steps; area under that curve — lower is better;
* ``insertion_auc``: the same, starting from the mean image and putting the most relevant pixels
  back — higher is better;
* ``specificity``: on captions naming two objects, the map of phrase A has more positive energy
  on A's mask than on B's (per pixel of each mask, so object size does not decide) — AGF's claim
  against saliency that highlights every salient object whatever the phrase;
* ``contrastive_specificity``: on phrases whose object has a twin (same shape and colour, another
  size: ``make_scene(..., confusable=True)``), the map of the contrast "this query for the
  phrase, not the query whose box is the twin's" (``ContrastTarget``) has more positive energy per
  pixel on the object's mask than on the twin's; ``twin_specificity`` is the plain map's
  specificity against the twin on the same phrases. Positive energy, because a contrast's sign
  says which side a pixel favours: negative relevance on the twin is evidence *for* the chosen
  object, so |map| would count it against the right answer.

Each method explains its own default target score (``DEFAULT_SCORES``), or one common score
for all that take one (``score=``); the JSON names the score each method used (``target_scores``).

Detection accuracy (``accuracy_iou50``) is the share of phrases whose query (the one with the most
softmax mass on the phrase's tokens, ``grounding.most_mass_query``) has a box with IoU ≥ 0.5 with
the object's box. Every mean is over phrases (specificity: over phrases of two-object captions).
"""
import hashlib
import json

import numpy as np
import torch
from torchvision.ops import box_iou

from .distributed import Group, run_items
from .errors import InputError
from .attribution.mdetr.methods import DEFAULT_SCORES, METHODS
from .attribution.mdetr.targets import ContrastTarget, QueryTokenTarget
from .explanation import explain, resolve_score
from .grounding import most_mass_query
from .inputs import encode_caption, model_input
from .prediction import box_cxcywh_to_xyxy
from .shapesworld import make_scene, twin
from .text import char_span_to_tokens

STEPS = 10


# ---------------------------------------------------------------- metrics on one map


def pointing_game(heatmap, box):
    y, x = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    x0, y0, x1, y1 = box
    return float(x0 <= x < x1 and y0 <= y < y1)


def box_mask(shape, box):
    mask = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask[max(y0, 0): max(y1, 0), max(x0, 0): max(x1, 0)] = True
    return mask


def energy_in_box(heatmap, box):
    positive = np.clip(heatmap, 0, None)
    total = positive.sum()
    return float(positive[box_mask(heatmap.shape, box)].sum() / total) if total > 0 else 0.0


def mask_iou(heatmap, mask):
    k = int(mask.sum())
    if k == 0:
        return 0.0
    top = np.zeros(heatmap.size, dtype=bool)
    top[np.argsort(-heatmap, axis=None, kind="stable")[:k]] = True
    top = top.reshape(heatmap.shape)
    return float((top & mask).sum() / (top | mask).sum())


def specific(heatmap, mask_a, mask_b):
    """1 when the map's positive energy per pixel is higher on A's mask than on B's."""
    positive = np.clip(heatmap, 0, None)
    return float(positive[mask_a].mean() > positive[mask_b].mean())


def auc(scores):
    """Trapezoidal area under a curve sampled at equal steps over [0, 1]."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(((scores[1:] + scores[:-1]) / 2).mean())


# ---------------------------------------------------------------- perturbation curves


#: Peak bytes a no-grad MDETR forward needs per input pixel of each image of a batch: ResNet-101
#: needs 0.36 GiB an image at 800 × 1066 (453 B/px) and 469 B/px at 320 × 426 (benchmarks/bench_evaluate.py).
FORWARD_BYTES_PER_PIXEL = 480
#: Memory the deletion/insertion forwards may use at once (bytes), by device type: a fixed
#: figure, so that the chunks, and with them the numbers, do not depend on what else is running.
PERTURBATION_MEMORY = {"cpu": 2 * 2**30, "cuda": 4 * 2**30}


def perturbation_chunk(pixels, memory=None):
    """How many perturbed copies of ``pixels`` (3 × H × W) one forward may take within
    ``memory`` bytes (default: :data:`PERTURBATION_MEMORY` for its device); at least one."""
    if memory is None:
        memory = PERTURBATION_MEMORY.get(pixels.device.type, PERTURBATION_MEMORY["cpu"])
    return max(1, int(memory // (pixels.shape[-2] * pixels.shape[-1] * FORWARD_BYTES_PER_PIXEL)))


def scores_on_images(model, text, image, count, chunk, targets):
    """Each target's score (softmax mass of its query on its tokens) on the images ``image(k)``,
    k < ``count``, run ``chunk`` at a time without gradients: a ``count`` × ``len(targets)`` array.

    On the CPU the images go in channels-last: oneDNN's convolutions take it faster (the toy's
    perturbation forwards 0.72×, ResNet-101's 0.89× here) and the scores move by ~1e-6."""
    scores = [torch.zeros(0, len(targets))]
    with torch.no_grad():
        for start in range(0, count, chunk):
            images = torch.stack([image(k) for k in range(start, min(start + chunk, count))])
            if images.device.type == "cpu":
                images = images.contiguous(memory_format=torch.channels_last)
            ids = {k: v.expand(len(images), -1) for k, v in text.items()}
            probs = model(images=images, text=ids)["pred_logits"].float().softmax(-1)
            scores.append(torch.stack([probs[:, t.query, list(t.tokens)].sum(-1) for t in targets], 1).cpu())
    return torch.cat(scores).numpy()


def perturbation_baseline(pixels):
    """What deletion puts in place of a pixel and insertion starts from: the image's mean colour."""
    return pixels.mean((1, 2), keepdim=True).expand_as(pixels)


def end_scores(model, pixels, text, targets, memory=None):
    """Each target's score on the unperturbed image and on the baseline: the two ends every
    deletion and insertion curve of this image shares, whatever the map (a 2 × ``len(targets)``
    array), so a caption runs them once rather than once per phrase and method."""
    ends = (pixels, perturbation_baseline(pixels))
    return scores_on_images(model, text, ends.__getitem__, 2, perturbation_chunk(pixels, memory), targets)


def perturbation_curves(model, pixels, text, heatmap, target, steps=STEPS, memory=None, ends=None):
    """(deletion scores, insertion scores), each relative to the unperturbed score, at 0..steps.

    ``ends``: the target's (unperturbed, baseline) scores from :func:`end_scores`, computed
    here when not given; the 2 × (steps − 1) images between them run in chunks of
    :func:`perturbation_chunk` images (``memory``: bytes), each built just before its forward,
    so a full-size image fits a small GPU or a CPU runtime."""
    if ends is None:
        ends = end_scores(model, pixels, text, [target], memory)[:, 0]
    device = pixels.device
    order = torch.from_numpy(np.argsort(-heatmap, axis=None, kind="stable").copy()).to(device)
    n = order.numel()
    baseline = perturbation_baseline(pixels)

    def perturbed(k):  # k < steps - 1: deletion step k + 1; after that, insertion step k - steps + 2
        i = k % (steps - 1) + 1
        chosen = torch.zeros(n, dtype=torch.bool, device=device)
        chosen[order[: round(n * i / steps)]] = True
        chosen = chosen.view(1, *heatmap.shape)
        return torch.where(chosen, baseline, pixels) if k < steps - 1 else torch.where(chosen, pixels, baseline)

    chunk = perturbation_chunk(pixels, memory)
    inner = scores_on_images(model, text, perturbed, 2 * (steps - 1), chunk, [target])[:, 0]
    full, empty = (float(v) for v in ends)
    reference = max(full, 1e-12)
    deletion = np.concatenate([[full], inner[: steps - 1], [empty]])
    insertion = np.concatenate([[empty], inner[steps - 1:], [full]])
    return deletion / reference, insertion / reference


# ---------------------------------------------------------------- the harness

METRICS = ("pointing_game", "energy_in_box", "mask_iou", "deletion_auc", "insertion_auc", "specificity",
           "contrastive_specificity", "twin_specificity")


def empty_scores(methods):
    return {m: {k: [] for k in METRICS} for m in methods}


def summarize(scores, hits, phrases, **extra):
    """The JSON the CLI writes: detection accuracy, every method's mean of every metric, and the
    same means over the phrases the model grounds correctly (``methods_when_detected``: an
    explanation of a wrong box should point at the wrong object, so these separate the
    explainer's quality from the detector's)."""
    def means(only_hits):
        return {m: {k: (float(np.mean(picked)) if (picked := [v for v, hit in values if hit or not only_hits])
                        else None) for k, values in s.items()} for m, s in scores.items()}

    return {"detection": {"n": phrases, "accuracy_iou50": hits / max(phrases, 1)},
            "methods": means(False), "methods_when_detected": means(True), **extra}


def method_scores(methods, score=None):
    """The target score each method explains: ``score`` for all that take one, else their default."""
    return {m: resolve_score(m, score if DEFAULT_SCORES.get(m) is not None else None) for m in methods}


def score_caption(model, image, caption, phrases, methods, scores, score=None, memory=None):
    """Ground and explain every phrase of one caption; append each method's metrics to ``scores``
    (as ``(value, whether the phrase's box is right)``).

    ``phrases``: dicts with ``span`` (characters of the caption), ``box`` (xyxy, pixels of the
    original image), ``mask`` (bool H×W) and ``other`` (the mask of another object for the
    specificity test, or None) and optionally ``twin`` (``{"box", "mask"}`` of an object the phrase
    would fit without its distinguishing word, for the contrastive specificity, or None).
    ``score``: a common target score (see ``method_scores``).
    Returns the number of phrases whose box is right (IoU ≥ 0.5).
    Shared by the ShapesWorld harness and the real-data script (``scripts/eval_refcoco.py``).
    ``memory``: bytes the perturbation forwards may use at once (:func:`perturbation_curves`).
    """
    pixels, (width, height) = model_input(model, image)
    encoding = encode_caption(model, caption)
    text = {k: encoding[k].to(pixels.device) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = model(images=pixels[None], text=text)
    logits = out["pred_logits"][0].float().cpu()
    boxes = box_cxcywh_to_xyxy(out["pred_boxes"][0].float().cpu(), width, height)
    targets, found = [], []
    for phrase in phrases:
        tokens = char_span_to_tokens(encoding, 0, *phrase["span"])
        query = most_mass_query(logits, tokens)  # as docs/evaluation.md measured it
        targets.append(QueryTokenTarget(query, tuple(tokens)))
        truth = torch.tensor([phrase["box"]], dtype=boxes.dtype)
        found.append(float(box_iou(boxes[query][None], truth)) >= 0.5)
    ends = end_scores(model, pixels, text, targets, memory)
    contrasts = contrast_targets(phrases, targets, boxes)
    for method, method_score in method_scores(methods, score).items():
        # one call for the plain and the contrast targets: a contrast's side a is its phrase's plain
        # target, which AGF then runs once, and every method runs one forward
        expls = explain(model, image, caption, target=targets + [c for _, c in contrasts], method=method,
                        score=method_score)
        expls, contrast_expls = expls[: len(targets)], expls[len(targets):]
        for i, (phrase, target, expl, hit) in enumerate(zip(phrases, targets, expls, found)):
            heat, got = expl.image.numpy(), scores[method]
            got["pointing_game"].append((pointing_game(heat, phrase["box"]), hit))
            got["energy_in_box"].append((energy_in_box(heat, phrase["box"]), hit))
            got["mask_iou"].append((mask_iou(heat, phrase["mask"]), hit))
            dele, ins = perturbation_curves(model, pixels, text, expl.input_map.numpy(), target, memory=memory,
                                            ends=ends[:, i])
            got["deletion_auc"].append((auc(dele), hit))
            got["insertion_auc"].append((auc(ins), hit))
            if phrase.get("other") is not None:
                got["specificity"].append((specific(heat, phrase["mask"], phrase["other"]), hit))
        score_contrasts(phrases, contrasts, expls, contrast_expls, found, scores[method])
    return sum(found)


def versus_query(boxes, query, box):
    """The query, other than ``query``, whose predicted box (xyxy) best overlaps ``box``: the box
    drawn for the object a contrast sets against the chosen one."""
    overlap = box_iou(boxes, torch.tensor([box], dtype=boxes.dtype))[:, 0]
    overlap[query] = -1
    return int(overlap.argmax())


def contrast_targets(phrases, targets, boxes):
    """(phrase index, contrast) for each phrase that has a ``twin``: its target against the query
    whose predicted box (xyxy) best overlaps the twin's."""
    return [(i, ContrastTarget(targets[i], QueryTokenTarget(versus_query(boxes, targets[i].query,
                                                                         phrase["twin"]["box"]), targets[i].tokens)))
            for i, phrase in enumerate(phrases) if phrase.get("twin") is not None]


def score_contrasts(phrases, contrasts, plain, contrast_expls, found, got):
    """``contrastive_specificity`` and ``twin_specificity`` of the phrases that have a ``twin``."""
    for (i, _), expl in zip(contrasts, contrast_expls):
        mask, other = phrases[i]["mask"], phrases[i]["twin"]["mask"]
        got["contrastive_specificity"].append((specific(expl.image.numpy(), mask, other), found[i]))
        got["twin_specificity"].append((specific(plain[i].image.numpy(), mask, other), found[i]))


def combine(records, methods):
    """(scores, hits, phrases) of per-item records (as :func:`score_caption` fills them), in
    the records' order: the accumulators a single pass over the items would have built."""
    scores = empty_scores(methods)
    for record in records:
        for method, metrics in record["scores"].items():
            for name, values in metrics.items():
                scores[method][name].extend(tuple(v) for v in values)
    return scores, sum(r["hits"] for r in records), sum(r["phrases"] for r in records)


def model_digest(model):
    """sha256 of the model's parameters and buffers: which weights a journal's records came from."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def scene_phrases(scene):
    """The ground truth :func:`score_caption` needs for every phrase of a ShapesWorld scene;
    ``other`` is the other object's mask on captions naming two objects."""
    two = len({p.object_index for p in scene.phrases}) == 2
    items = []
    for phrase in scene.phrases:
        obj = scene.objects[phrase.object_index]
        other = next((scene.objects[p.object_index].mask for p in scene.phrases
                      if p.object_index != phrase.object_index), None) if two else None
        double = twin(scene, phrase.object_index)
        items.append({"span": phrase.char_span, "box": obj.box_xyxy, "mask": obj.mask, "other": other,
                      "twin": None if double is None else {"box": scene.objects[double].box_xyxy,
                                                           "mask": scene.objects[double].mask}})
    return items


def evaluate(model, methods=None, n=200, seed=2_000_000, progress=True, score=None, *, group=None,
             journal=None, memory=None, confusable=False):
    """Scores on ``n`` ShapesWorld scenes from ``seed`` (use seeds never used for training) of
    ``methods`` (default: every one of ``METHODS``), each explaining its default score, or ``score`` for all that take one.

    ``group`` (:func:`mdetr_agf.distributed.join`): the torchrun job sharing the scenes; rank 0
    gets the results, the other ranks None. ``journal``: a JSON-lines file every scene's record
    is appended to as it finishes; a rerun with the same arguments skips the scenes it holds.
    ``memory``: bytes the perturbation forwards may use at once (:func:`perturbation_curves`).
    ``confusable``: draw every scene with a pair the phrase could fit but for its size word
    (``make_scene(..., confusable=True)``), so every phrase has a ``contrastive_specificity``.
    """
    methods = list(METHODS) if methods is None else methods
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n is how many scenes to evaluate: an int of at least 1, got {n!r}")
    used = method_scores(methods, score)
    group = group or Group(device=next(model.parameters()).device)

    def score_scene(index, scene_seed):
        scene = make_scene(scene_seed, confusable=confusable)
        phrases, scores = scene_phrases(scene), empty_scores(methods)
        hits = score_caption(model, scene.image, scene.caption, phrases, methods, scores, score, memory=memory)
        return {"seed": scene_seed, "phrases": len(phrases), "hits": hits, "scores": scores}

    header = {"job": "shapesworld", "model": model_digest(model), "methods": list(methods), "target_scores": used,
              "seed": seed, "steps": STEPS, **({"confusable": True} if confusable else {})}
    records = run_items(group, range(seed, seed + n), score_scene, header=header, journal=journal,
                        progress=progress, desc="evaluating")
    if records is None:
        return None
    scores, hits, phrases = combine(records, methods)
    return summarize(scores, hits, phrases, scenes={"n": n, "seed": seed, "confusable": bool(confusable)},
                     target_scores=used,
                     world_size=group.world_size)


def write_json(results, path):
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
