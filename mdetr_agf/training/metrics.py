"""Referring-expression accuracy of a (toy) model on ShapesWorld: each phrase is grounded to the
query with the most softmax mass on its tokens, and counts when that box has IoU ≥ 0.5 with
its object's box."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

from .. import shapesworld
from ..grounding import most_mass_query
from ..prediction import box_cxcywh_to_xyxy
from .data import make_batch
from .toy import TOY_INPUT_SIZE


@torch.no_grad()
def ground_phrases(model, scenes: Sequence[shapesworld.Scene], tokenizer=None,
                   size: int = TOY_INPUT_SIZE) -> list[list[tuple[float, float, float, float]]]:
    """Per scene, per phrase: the box (xyxy pixels) of the query with the most softmax mass on
    the phrase's tokens."""
    tokenizer = tokenizer or model.get_tokenizer()
    batch = make_batch(scenes, tokenizer, size)
    device = next(model.parameters()).device
    out = model(images=batch.images.to(device), text={k: batch.text[k] for k in ("input_ids", "attention_mask")})
    logits, result = out["pred_logits"].float().cpu(), []
    for i, (scene, t) in enumerate(zip(scenes, batch.targets)):
        boxes = box_cxcywh_to_xyxy(out["pred_boxes"][i].float().cpu(), *scene.image.size)
        result.append([tuple(float(v) for v in boxes[most_mass_query(logits[i], tokens)]) for tokens in t["tokens"]])
    return result


def phrase_ious(model, scenes: Sequence[shapesworld.Scene], tokenizer=None,
                size: int = TOY_INPUT_SIZE) -> list[float]:
    """IoU of each phrase's grounded box (:func:`ground_phrases`) with its object's box, scene
    by scene, phrase by phrase."""
    ious = []
    for scene, boxes in zip(scenes, ground_phrases(model, scenes, tokenizer, size)):
        for phrase, box in zip(scene.phrases, boxes):
            gold = torch.tensor([scene.objects[phrase.object_index].box_xyxy])
            ious.append(float(box_iou(torch.tensor([box]), gold)[0, 0]))
    return ious


def grounding_accuracy(model, seeds: Iterable[int], tokenizer=None, batch_size: int = 64,
                       size: int = TOY_INPUT_SIZE) -> dict:
    """Referring-expression accuracy at IoU ≥ 0.5 over every phrase of the ShapesWorld scenes
    ``seeds`` (with the phrase count, scene count and mean IoU)."""
    was_training = model.training
    model.eval()
    seeds = [int(s) for s in seeds]
    ious = []
    try:
        for k in range(0, len(seeds), batch_size):
            ious += phrase_ious(model, [shapesworld.make_scene(s) for s in seeds[k: k + batch_size]], tokenizer, size)
    finally:
        model.train(was_training)
    hits, total = sum(iou >= 0.5 for iou in ious), len(ious)
    return {"accuracy": hits / max(total, 1), "phrases": total, "scenes": len(seeds),
            "mean_iou": float(np.mean(ious)) if ious else float("nan")}


def accuracy_iou50(model, seeds: Iterable[int], tokenizer=None, batch_size: int = 64) -> float:
    """Fraction of phrases whose top-scoring box (most softmax mass on the phrase's tokens) has
    IoU ≥ 0.5 with the phrase's ground-truth box."""
    return grounding_accuracy(model, seeds, tokenizer, batch_size)["accuracy"]
