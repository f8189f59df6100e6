"""Training MDETR on ShapesWorld: MDETR's objective, on a model small enough for two CPU cores.

The objective follows Kamath et al. (2021), §2.2 and the reference ``SetCriterion``:

* **Positive maps.** A target box is tied to the caption tokens of its phrase; its row of the
  positive map is 1 on those token positions, normalized to sum 1 (a distribution over the
  256 positions; the last one, 255, means "no object").
* **Hungarian matching** of queries to targets on
  ``1·(−Σ softmax(logits)·positive_map) + 5·L1(boxes) + 2·(−GIoU)``.
* **Soft-token prediction**: cross-entropy of each query's softmax over 256 positions against
  its matched target's positive map, or against "no object" (weighted ``eos_coef`` = 0.1) when
  unmatched; **boxes**: L1 (weight 5) and 1 − GIoU (weight 2) on matched queries;
  **contrastive alignment**: InfoNCE (temperature 0.07) between the projected queries and
  tokens, both directions. Every loss is divided by the number of target boxes, and the
  same losses are applied to every decoder layer's output (DETR's auxiliary losses).

Only one detail differs from the reference: padding tokens are left out of the contrastive
softmax (the reference lets them compete as negatives, which only matters when captions of a
batch differ in length, as ShapesWorld's do). One term can be added that the reference does not
have: an **attribute loss** (``attribute_loss``), a throw-away linear head asking each matched
query for its object's colour, shape and size. With MDETR's losses alone, the toy never learns
what colour words refer to within its training budget (docs/evaluation.md).

:func:`train` trains the toy model shipped in ``assets/toy``; :func:`accuracy_iou50` measures
referring-expression accuracy on held-out scenes.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from . import shapesworld
from .errors import InputError
from .images import prepare
from .models.build import ModelConfig, build_model
from .models.mdetr import pad_images
from .models.text_encoder import TextConfig
from .text import MAX_POSITIONS, char_span_to_tokens, tokenize, train_tokenizer

#: Side of the (square) ShapesWorld images the toy model is trained and run at.
TOY_INPUT_SIZE = 160
#: The bundled tokenizer's folder, relative to the package directory.
TOY_TOKENIZER = "assets/toy/tokenizer"
#: Scene seeds the toy model may train on; held-out evaluation uses seeds >= EVAL_SEED_START.
TRAIN_SEEDS = range(0, 100_000)
EVAL_SEED_START = 1_000_000
#: Scenes for watching training (and choosing its options), apart from both of the above.
VALIDATION_SEED_START = 500_000
#: MDETR's loss weights (``--ce_loss_coef``, ``--bbox_loss_coef``, ``--giou_loss_coef``,
#: ``--contrastive_align_loss_coef``) and matching costs (``--set_cost_*``).
LOSS_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_contrastive_align": 1.0}
#: The object attributes the auxiliary attribute loss asks the matched queries for, in class order.
ATTRIBUTES = {"colour": list(shapesworld.COLOURS), "shape": list(shapesworld.SHAPES),
              "size": list(shapesworld.SIZES)}


# ---------------------------------------------------------------- model and tokenizer


def toy_config(vocab_size: int, tokenizer: str | None = TOY_TOKENIZER, backbone: str = "small_cnn",
               enc_layers: int = 2, dec_layers: int = 2) -> ModelConfig:
    """The toy MDETR: small CNN, 64-wide transformer (2+2 layers by default), 2-layer RoBERTa, 8 queries."""
    return ModelConfig(backbone=backbone, text_encoder="toy", num_queries=8, hidden_dim=64, nheads=4,
                       enc_layers=enc_layers, dec_layers=dec_layers, dim_feedforward=128,
                       text_config=TextConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=128,
                                              max_position_embeddings=64),
                       tokenizer=tokenizer)


def toy_tokenizer():
    """A byte-level BPE tokenizer (RoBERTa's conventions) in which every ShapesWorld word is one token.

    Trained on the words of :func:`shapesworld.vocabulary`, each alone (a caption's first word)
    and after a space (every other word), until no merge is left; a pure function of the
    vocabulary, so it is the same on every machine.
    """
    words = shapesworld.vocabulary()
    texts = [" ".join(words), " ".join(reversed(words))] * 4 + [w for w in words for _ in range(4)]
    return train_tokenizer(texts, vocab_size=1000, min_frequency=1)


def init_weights(model: nn.Module) -> nn.Module:
    """He initialization for the backbone's convolutions (they have no normalization to rescue
    a shrinking signal); everything else keeps PyTorch's defaults, as DETR does."""
    for m in model.backbone.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


# ---------------------------------------------------------------- boxes


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def box_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU (and union) of xyxy boxes: (N, 4) × (M, 4) → (N, M)."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a)[:, None] + box_area(b)[None, :] - inter
    return inter / union.clamp(min=1e-12), union


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (Rezatofighi et al. 2019) of xyxy boxes: IoU − (hull − union) / hull."""
    iou, union = box_iou(a, b)
    lt = torch.min(a[:, None, :2], b[None, :, :2])
    rb = torch.max(a[:, None, 2:], b[None, :, 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-12)


# ---------------------------------------------------------------- targets


@dataclass
class Batch:
    images: torch.Tensor  # (N / repeats, 3, S, S), normalized: each image once
    text: dict  # input_ids, attention_mask (and offset_mapping): N captions
    targets: list[dict]  # per caption: boxes (T, 4) cxcywh in [0, 1], tokens: list of T token lists
    positive_map: torch.Tensor  # (all targets, 256), rows sum to 1
    scenes: list = field(default_factory=list, repr=False)
    repeats: int = 1  # captions per image: captions k·repeats … (k+1)·repeats − 1 describe image k


def phrase_token_lists(encoding, batch_index: int, phrases: Sequence[shapesworld.Phrase]) -> list[list[int]]:
    """Token positions of each phrase's character span (row ``batch_index`` of ``encoding``)."""
    return [char_span_to_tokens(encoding, batch_index, *p.char_span) for p in phrases]


def positive_map(token_lists: Sequence[Sequence[int]], max_positions: int = MAX_POSITIONS) -> torch.Tensor:
    """(targets, 256): 1 on each target's token positions, each row normalized to sum 1."""
    out = torch.zeros(len(token_lists), max_positions)
    for row, tokens in enumerate(token_lists):
        if not tokens:
            raise InputError(f"target {row} covers no token; every phrase must cover at least one token")
        if max(tokens) >= max_positions - 1:
            raise InputError(f"token position {max(tokens)} is past the {max_positions - 1} usable positions")
        out[row, list(tokens)] = 1.0
    return out / out.sum(-1, keepdim=True)


def scene_tensor(image, size: int = TOY_INPUT_SIZE) -> torch.Tensor:
    """A ShapesWorld image as the toy model sees it (the same transform as ``predict``)."""
    return prepare(image, size=size, max_size=size)[0]


def training_scene(seed: int, similar: float = 0.0) -> shapesworld.Scene:
    """ShapesWorld scene ``seed``, or, for a share ``similar`` of the seeds, a scene whose
    objects are drawn from one or two shapes (chosen by a generator seeded by ``(seed, 1)``).
    In the world's own scenes shape and size single out most objects, and the toy trained on
    them with MDETR's losses alone never learns colour, so "the red circle" next to a blue
    circle is a coin toss. Scenes of similar objects make the colour words matter more often;
    within the training budget that did not help (the attribute loss did: docs/evaluation.md)."""
    rng = np.random.Generator(np.random.PCG64([int(seed), 1]))
    if rng.random() >= similar:
        return shapesworld.make_scene(seed)
    shapes = tuple(str(s) for s in rng.choice(shapesworld.SHAPES, size=int(rng.integers(1, 3)), replace=False))
    return shapesworld.make_scene(seed, shapes=shapes)


def caption_variants(scene: shapesworld.Scene, seed: int, count: int,
                     all_objects: int = 0, contrast: int = 0) -> list[shapesworld.Scene]:
    """The scene itself and ``count − 1`` more captions of its image, drawn by ShapesWorld's own
    caption writer from generators seeded by ``(seed, k)``: more referring expressions for one
    backbone pass (the image features do not depend on the caption). The last ``all_objects``
    of them name every object instead (:func:`all_objects_caption`); the ``contrast`` before
    those refer to objects that share their shape with another one (:func:`contrast_caption`)."""
    variants = [scene]
    for k in range(1, count):
        rng = np.random.Generator(np.random.PCG64([int(seed), k]))
        if k >= count - all_objects:
            caption, phrases = all_objects_caption(rng, scene.objects)
        elif k >= count - all_objects - contrast:
            caption, phrases = contrast_caption(rng, scene.objects, scene.image.size[0])
        else:
            caption, phrases = shapesworld._caption(rng, scene.objects, scene.image.size[0])
        variants.append(shapesworld.Scene(scene.image, caption, scene.objects, phrases))
    return variants


def all_objects_caption(rng: np.random.Generator, objects) -> tuple[str, list[shapesworld.Phrase]]:
    """"a small red circle and a large blue star ...": every object in a random order, fully
    described. Like the fully annotated captions of MDETR's pre-training, it gives every object
    a phrase, so the contrastive alignment learns each object's words from every image, not only
    from the one or two objects a referring expression picks out."""
    caption, phrases = "", []
    for i in rng.permutation(len(objects)):
        o = objects[int(i)]
        if caption:
            caption += " and "
        text = f"{shapesworld.ARTICLES[rng.integers(len(shapesworld.ARTICLES))]} {o.size} {o.colour} {o.shape}"
        phrases.append(shapesworld.Phrase(text, (len(caption), len(caption) + len(text)), int(i)))
        caption += text
    return caption, phrases


def contrast_caption(rng: np.random.Generator, objects, size: int) -> tuple[str, list[shapesworld.Phrase]]:
    """A referring expression for one or two objects of a shape the image holds more than once
    ("the red circle and the blue circle"), written by ShapesWorld's caption writer: only the
    colour or size words tell the referents apart, the signal the world's own captions give
    least often (about one phrase in six); an ordinary caption when no shape repeats."""
    shapes = [o.shape for o in objects]
    repeated = [i for i, shape in enumerate(shapes) if shapes.count(shape) > 1]
    if not repeated:
        return shapesworld._caption(rng, objects, size)
    first = int(rng.choice(repeated))
    twins = [i for i in repeated if i != first and shapes[i] == shapes[first]]
    picked = [first] if rng.random() < 0.5 else [first, int(rng.choice(twins))]
    return shapesworld._caption(rng, objects, size, picked)


def make_batch(scenes: Sequence[shapesworld.Scene], tokenizer, size: int = TOY_INPUT_SIZE,
               repeats: int = 1) -> Batch:
    """Tensors and targets for ``scenes``; with ``repeats`` > 1, each run of ``repeats``
    consecutive scenes must share one image, which is then stored once."""
    if len(scenes) % repeats:
        raise InputError(f"{len(scenes)} scenes do not split into runs of {repeats}")
    encoding = tokenize(tokenizer, [s.caption for s in scenes])
    targets, maps = [], []
    for i, scene in enumerate(scenes):
        width, height = scene.image.size
        tokens = phrase_token_lists(encoding, i, scene.phrases)
        xyxy = torch.tensor([scene.objects[p.object_index].box_xyxy for p in scene.phrases], dtype=torch.float32)
        xyxy = xyxy / torch.tensor([width, height, width, height], dtype=torch.float32)
        attributes = [[names.index(getattr(scene.objects[p.object_index], a)) for a, names in ATTRIBUTES.items()]
                      for p in scene.phrases]
        attributes = torch.tensor(attributes, dtype=torch.long).view(-1, len(ATTRIBUTES))
        targets.append({"boxes": box_xyxy_to_cxcywh(xyxy), "tokens": tokens, "attributes": attributes})
        maps.append(positive_map(tokens))
    images = torch.stack([scene_tensor(s.image, size) for s in scenes[::repeats]])
    text = {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"],
            "offset_mapping": encoding["offset_mapping"]}
    return Batch(images, text, targets, torch.cat(maps), list(scenes), repeats)


# ---------------------------------------------------------------- matcher and losses


class HungarianMatcher:
    """One-to-one assignment of queries to target boxes minimizing MDETR's matching cost."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, target_boxes: torch.Tensor,
                    target_map: torch.Tensor) -> torch.Tensor:
        """(queries, targets) cost: logits (Q, 256), boxes (Q, 4) cxcywh; target_map (T, 256)."""
        prob = logits.softmax(-1)
        cost_class = -(prob @ target_map.T)
        cost_bbox = torch.cdist(boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
        return self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou

    @torch.no_grad()
    def __call__(self, outputs: dict, targets: Sequence[dict], positive_map: torch.Tensor):
        """Per image, (query indices, target indices), both int64 and sorted by query.

        The costs of every query against every target of the batch are computed at once (as
        DETR's matcher does) and each image's block is assigned on its own."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        n_img, n_query = logits.shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        empty = torch.zeros(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in targets]
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes.device)
        cost = self.cost_matrix(logits.flatten(0, 1), boxes.flatten(0, 1), target_boxes,
                                positive_map[: sum(sizes)].to(logits.device))
        cost = cost.view(n_img, n_query, -1).cpu().numpy()
        indices, start = [], 0
        for i, n in enumerate(sizes):
            if n == 0:
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(cost[i, :, start:start + n])
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
            start += n
        return indices


class SetCriterion(nn.Module):
    """MDETR's losses for one set of outputs (call it once per decoder layer)."""

    def __init__(self, matcher: HungarianMatcher | None = None, eos_coef: float = 0.1, temperature: float = 0.07,
                 attribute_head: nn.Module | None = None):
        super().__init__()
        self.matcher = matcher or HungarianMatcher()
        self.eos_coef, self.temperature = eos_coef, temperature
        self.attribute_head = attribute_head

    def loss_attributes(self, outputs, targets, indices, num_boxes):
        """Not MDETR's: cross-entropy of the head's reading of each matched query's state against
        its object's colour, shape and size (summed), divided by the number of target boxes.

        Colour singles out an object less often than shape or size in ShapesWorld's captions,
        and the soft-token and contrastive losses alone never make the queries carry it; asked
        for it directly, they do, and the colour words then bind to the right objects."""
        logits = self.attribute_head(outputs["hidden_states"][self._src_index(indices)])
        gold = torch.cat([t["attributes"][j] for t, (_, j) in zip(targets, indices)]).to(logits.device)
        parts = torch.split(logits, [len(v) for v in ATTRIBUTES.values()], -1)
        return sum(F.cross_entropy(part.float(), gold[:, k], reduction="sum") for k, part in enumerate(parts)) / num_boxes

    @staticmethod
    def _src_index(indices):
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        return batch, torch.cat([src for src, _ in indices])

    @staticmethod
    def _target_rows(indices, targets):
        rows, start = [], 0
        for (_, tgt), t in zip(indices, targets):
            rows.append(tgt + start)
            start += len(t["boxes"])
        return torch.cat(rows)

    def loss_labels(self, outputs, targets, positive_map, indices, num_boxes):
        logp = outputs["pred_logits"].log_softmax(-1)
        src = self._src_index(indices)
        target = torch.zeros_like(logp)
        target[..., -1] = 1.0
        target[src] = positive_map[self._target_rows(indices, targets)].to(logp)
        weight = torch.full(logp.shape[:2], self.eos_coef, device=logp.device)
        weight[src] = 1.0
        return (-(logp * target).sum(-1) * weight).sum() / num_boxes

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        src = self._src_index(indices)
        pred = outputs["pred_boxes"][src]
        gold = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred)
        l1 = F.l1_loss(pred, gold, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gold)))
        return l1, (1 - giou).sum() / num_boxes

    def loss_contrastive_align(self, outputs, targets, indices, num_boxes, attention_mask):
        logits = outputs["proj_queries"] @ outputs["proj_tokens"].transpose(-1, -2) / self.temperature
        positive = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        for i, ((src, tgt), t) in enumerate(zip(indices, targets)):
            for q, j in zip(src.tolist(), tgt.tolist()):
                positive[i, q, t["tokens"][j]] = True
        pad = attention_mask.eq(0)[:, None, :].to(logits.device)  # (N, 1, T)
        positive_logits = logits.masked_fill(~positive, 0)
        # queries → tokens: softmax over the caption's real tokens
        q_pos = positive.any(2)
        q_loss = (-positive_logits.sum(2) / (positive.sum(2) + 1e-6)
                  + logits.masked_fill(pad, float("-inf")).logsumexp(2))
        q_loss = q_loss.masked_fill(~q_pos, 0).sum()
        # tokens → queries: softmax over all queries
        t_pos = positive.any(1)
        t_loss = -positive_logits.sum(1) / (positive.sum(1) + 1e-6) + logits.logsumexp(1)
        t_loss = t_loss.masked_fill(~t_pos, 0).sum()
        return (q_loss + t_loss) / 2 / num_boxes

    def forward(self, outputs: dict, targets: Sequence[dict], positive_map: torch.Tensor,
                attention_mask: torch.Tensor) -> dict:
        indices = self.matcher(outputs, targets, positive_map)
        num_boxes = max(float(sum(len(t["boxes"]) for t in targets)), 1.0)
        losses = {"loss_ce": self.loss_labels(outputs, targets, positive_map, indices, num_boxes)}
        losses["loss_bbox"], losses["loss_giou"] = self.loss_boxes(outputs, targets, indices, num_boxes)
        if "proj_queries" in outputs:
            losses["loss_contrastive_align"] = self.loss_contrastive_align(
                outputs, targets, indices, num_boxes, attention_mask)
        if self.attribute_head is not None:
            losses["loss_attributes"] = self.loss_attributes(outputs, targets, indices, num_boxes)
        return losses


def _encode_repeated(model, images, text, repeats: int) -> dict:
    """``model.encode`` for ``repeats`` captions per image: the backbone runs once per image and
    its features are repeated (the same numbers as encoding each pair on its own)."""
    images, mask = pad_images(images)
    features, masks, pos = model.backbone(images, mask)
    src = model.input_proj(features[-1])
    hw = src.shape[-2] * src.shape[-1]
    src = src.flatten(2).transpose(1, 2).repeat_interleave(repeats, 0)
    pos = pos.flatten(2).transpose(1, 2).repeat_interleave(repeats, 0)
    image_mask = masks[-1].flatten(1).repeat_interleave(repeats, 0)
    input_ids, attention_mask = model.tokenize(text, src.device)
    text_memory_resized = model.transformer.resizer(model.transformer.text_encoder(input_ids, attention_mask))
    joint = torch.cat([src, text_memory_resized], dim=1)
    joint_pos = torch.cat([pos, torch.zeros_like(text_memory_resized)], dim=1)
    joint_mask = torch.cat([image_mask, attention_mask.eq(0)], dim=1)
    memory = model.transformer.encoder(joint, joint_pos, joint_mask)
    return {"img_memory": memory, "pos": joint_pos, "mask": joint_mask, "text_memory": memory[:, hw:],
            "attention_mask": attention_mask}


def forward_all_layers(model, images, text, repeats: int = 1) -> list[dict]:
    """The heads applied to every decoder layer's output (last layer last), as MDETR's aux loss.

    ``repeats``: captions per image (``text`` holds ``len(images) · repeats`` captions).
    """
    cache = model.encode(images, text) if repeats == 1 else _encode_repeated(model, images, text, repeats)
    states = model.decode(cache)
    return [model.heads(states[: k + 1], cache) for k in range(len(states))]


def total_loss(criterion: SetCriterion, outputs_per_layer: list[dict], batch: Batch,
               weights: dict = LOSS_WEIGHTS) -> tuple[torch.Tensor, dict]:
    """Weighted sum of every layer's losses, and the last layer's unweighted losses (for logs)."""
    total, last = 0.0, {}
    for outputs in outputs_per_layer:
        last = criterion(outputs, batch.targets, batch.positive_map, batch.text["attention_mask"])
        total = total + sum(weights[k] * v for k, v in last.items())
    return total, {k: float(v.detach()) for k, v in last.items()}


# ---------------------------------------------------------------- training


@dataclass
class TrainResult:
    model: nn.Module
    tokenizer: object
    losses: list[float]  # total loss per step
    seconds: float
    options: dict


class _StepLoss(nn.Module):
    """One step's forward and loss as a module, so that DistributedDataParallel, which hooks a
    module's forward, averages the gradients of everything it trains (model and attribute head)."""

    def __init__(self, model, criterion, weights, aux_loss, bf16, memory_format):
        super().__init__()
        self.model, self.criterion = model, criterion
        self.weights, self.aux_loss, self.bf16, self.memory_format = weights, aux_loss, bf16, memory_format

    def forward(self, batch: Batch):
        images = batch.images.contiguous(memory_format=self.memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            outputs = forward_all_layers(self.model, images, batch.text, batch.repeats)
        if self.bf16:  # the losses and the matching in float32
            outputs = [{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in o.items()}
                       for o in outputs]
        return total_loss(self.criterion, outputs if self.aux_loss else outputs[-1:], batch, self.weights)


def _lr_factor(step: int, steps: int, warmup: int, final: float = 0.02) -> float:
    """Linear warm-up, then cosine decay to ``final`` × the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))


def _prefetch(iterator, depth: int = 2):
    """Yield the iterator's items, producing the next ones in a background thread (scene
    drawing is numpy and PIL, which release the GIL while the model trains)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)
            return
        q.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def train(steps: int = 11500, seed: int = 0, batch_size: int = 16, lr: float = 1e-3, *,
          weight_decay: float = 1e-4, warmup: int = 200, clip_max_norm: float = 0.1,
          scene_seeds: Iterable[int] | None = None, model: nn.Module | None = None, tokenizer=None,
          captions_per_image: int = 4, all_objects_captions: int = 0, contrast_captions: int = 0,
          similar_scenes: float = 0.0, backbone: str = "small_cnn",
          enc_layers: int = 2, dec_layers: int = 2,
          text_pretrain_steps: int = 0, text_lr_scale: float = 1.0, attribute_loss: float = 0.0,
          loss_weights: dict | None = None,
          eos_coef: float = 0.1, aux_loss: bool = True, dropout: float | None = 0.0, channels_last: bool = True,
          bf16: bool = False,
          threads: int | None = None, progress: bool = True, log_every: int = 0, log=print,
          callback=None, callback_every: int = 0, checkpoint: str | None = None,
          checkpoint_every: int = 500) -> TrainResult:
    """Train a (toy) MDETR on ShapesWorld scenes with AdamW; seeded and deterministic.

    ``scene_seeds``: the scenes to draw batches from, in an order shuffled by ``seed``
    (default :data:`TRAIN_SEEDS`); batches walk through them epoch by epoch. ``model`` and
    ``tokenizer`` default to a fresh :func:`toy_config` model and :func:`toy_tokenizer`.
    ``clip_max_norm`` 0.1 and ``weight_decay`` 1e-4 are MDETR's; the learning rate is higher
    than its 1e-4 because nothing here is pre-trained. ``dropout`` replaces every dropout
    probability while training (0: every scene is new, so there is nothing to overfit; None:
    keep the model's 0.1); the model is handed back with its own probabilities, in eval mode.
    ``channels_last`` only changes the memory layout (faster convolutions on CPU); ``bf16`` runs
    the forward pass under bfloat16 autocast (weights, losses and matching stay float32), about
    1.6× faster on CPUs with AVX512-BF16.
    ``captions_per_image`` > 1 adds captions of each image written by ShapesWorld's caption
    writer (:func:`caption_variants`); the backbone still sees each image once per step.
    ``backbone``, ``enc_layers``, ``dec_layers``: the toy configuration when ``model`` is None
    (backbone "small_cnn" or "small_cnn_s16").
    ``all_objects_captions`` of them name every object of the image (see :func:`all_objects_caption`),
    ``contrast_captions`` refer to objects whose shape repeats (see :func:`contrast_caption`).
    ``similar_scenes``: the share of training scenes drawn from one or two shapes (:func:`training_scene`).
    ``text_pretrain_steps`` > 0 first trains the text encoder alone as a masked language model
    on ShapesWorld captions (:func:`pretrain_text_encoder`), as MDETR starts from a pre-trained
    RoBERTa; ``text_lr_scale`` multiplies its learning rate afterwards (MDETR: 5e-5 / 1e-4; 0
    holds the text encoder fixed, which keeps the word identities the pre-training gave it).
    ``attribute_loss`` > 0 adds, with that weight, a loss that is not MDETR's: a linear head on each
    matched query's state (every decoder layer) must name its object's colour, shape and size
    (:meth:`SetCriterion.loss_attributes`); the head is discarded after training, so the model is
    unchanged in form. Without it the toy never learns colour (see docs/evaluation.md).
    ``loss_weights`` (default :data:`LOSS_WEIGHTS`) and ``eos_coef`` weigh the losses.
    ``callback(step, model)`` runs every ``callback_every`` steps (e.g. a validation score).
    ``checkpoint``: a file to save the training state to every ``checkpoint_every`` steps and
    to resume from when it exists (with the same options, a resumed run ends where an
    uninterrupted one would, up to float rounding).

    Data-parallel: called in every process of a torchrun job with an initialized
    ``torch.distributed`` group (``torchrun --nproc_per_node=2 scripts/train_toy.py``, which
    joins it with :func:`mdetr_agf.distributed.join`), each process draws the same batches,
    trains on its share of each batch's images, DistributedDataParallel averages the gradients
    during every backward pass, and a check at the end raises unless every process ends with
    the same weights. One process per CPU core uses the cores better than threads do here (small
    convolutions and matrices: two threads are no faster than one, two processes are 1.6×).
    Only process 0 logs, shows progress, calls ``callback`` and writes ``checkpoint``.
    """
    from tqdm.auto import tqdm

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}")
    rank, world = _process_group()
    _check_batch_split(batch_size, world)
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if tokenizer is None:
        tokenizer = toy_tokenizer()
    if model is None:
        model = init_weights(build_model(toy_config(len(tokenizer), backbone=backbone, enc_layers=enc_layers,
                                                    dec_layers=dec_layers)))
    model.tokenizer = tokenizer
    pool = np.asarray(list(TRAIN_SEEDS if scene_seeds is None else scene_seeds), dtype=np.int64)
    if len(pool) == 0:
        raise InputError("scene_seeds is empty")
    rng = np.random.Generator(np.random.PCG64(seed))
    if text_pretrain_steps:
        pretrain_text_encoder(model, tokenizer, text_pretrain_steps, seed=seed, lr=lr,
                              log=log if log_every and rank == 0 else None)
    held = [p for p in model.transformer.text_encoder.parameters() if p.requires_grad] if text_lr_scale == 0 else []
    for p in held:  # the pre-trained text encoder is held fixed: no gradients to compute
        p.requires_grad_(False)
    groups = []
    for text in (False, True):
        named = [(n, p) for n, p in model.named_parameters()
                 if n.startswith("transformer.text_encoder.") == text and p.requires_grad]
        scale = text_lr_scale if text else 1.0
        groups += [{"params": [p for n, p in named if p.ndim > 1 and "embeddings" not in n],
                    "weight_decay": weight_decay, "lr": lr * scale},
                   {"params": [p for n, p in named if not (p.ndim > 1 and "embeddings" not in n)],
                    "weight_decay": 0.0, "lr": lr * scale}]
    head = None
    if attribute_loss:  # a training aid only: it is thrown away with the optimizer
        head = nn.Linear(model.config.hidden_dim, sum(len(v) for v in ATTRIBUTES.values()))
        groups.append({"params": list(head.parameters()), "weight_decay": 0.0, "lr": lr})
    trained = nn.ModuleList([model] + ([head] if head is not None else []))
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, min(warmup, steps)))
    criterion = SetCriterion(eos_coef=eos_coef, attribute_head=head)
    weights = dict(LOSS_WEIGHTS if loss_weights is None else loss_weights)
    if head is not None:
        weights["loss_attributes"] = attribute_loss
    dropouts = {m: m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    if dropout is not None:
        for m in dropouts:
            m.p = dropout
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    model.train()

    losses, first = [], 0
    if checkpoint is not None and os.path.exists(checkpoint):
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if saved["steps"] != steps:
            raise InputError(f"{checkpoint} belongs to a {saved['steps']}-step run, not {steps}; delete it or "
                             f"pass the same steps")
        saved_head = saved.get("attribute_head")
        if (saved_head is None) != (head is None):
            written = "without" if saved_head is None else "with"
            raise InputError(f"{checkpoint} was written by a run {written} the attribute loss; resume it "
                             f"{written} --attribute-loss (or delete it to start over)")
        model.load_state_dict(saved["model"])
        if head is not None:
            head.load_state_dict(saved_head)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        losses, first = list(saved["losses"]), int(saved["step"])
        log(f"resumed from {checkpoint} at step {first}")

    def batches():
        order, cursor = rng.permutation(pool), 0
        for step in range(steps):
            chosen = []
            while len(chosen) < batch_size:
                if cursor == len(order):
                    order, cursor = rng.permutation(pool), 0
                take = order[cursor: cursor + batch_size - len(chosen)]
                chosen.extend(int(s) for s in take)
                cursor += len(take)
            if step < first:
                continue  # already trained on (resuming): only the order is replayed
            share = batch_size // world
            chosen = chosen[rank * share: (rank + 1) * share]
            scenes = [v for s in chosen for v in caption_variants(training_scene(s, similar_scenes), s, captions_per_image,
                                                                  all_objects_captions, contrast_captions)]
            yield make_batch(scenes, tokenizer, repeats=captions_per_image)

    start = time.perf_counter()
    if rank:
        progress, log_every, callback, checkpoint = False, 0, None, None
    bar = tqdm(_prefetch(batches()), initial=first, total=steps, disable=not progress, desc="training",
               dynamic_ncols=True)
    step_loss = runner = _StepLoss(model, criterion, weights, aux_loss, bf16, memory_format)
    if world > 1:  # the gradients are averaged over the processes during backward, in buckets
        runner = nn.parallel.DistributedDataParallel(step_loss, find_unused_parameters=True)
    for step, batch in enumerate(bar, start=first):
        loss, parts = runner(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_max_norm:
            nn.utils.clip_grad_norm_(trained.parameters(), clip_max_norm)
        optimizer.step()
        schedule.step()
        if world > 1:  # the loss of the whole batch, for the logs
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", ce=f"{parts['loss_ce']:.2f}", giou=f"{parts['loss_giou']:.2f}")
        if log_every and (step + 1) % log_every == 0:
            recent = float(np.mean(losses[-log_every:]))
            log(f"step {step + 1}/{steps}  loss {recent:.4f}  "
                + "  ".join(f"{k[5:]} {v:.3f}" for k, v in parts.items())
                + f"  lr {schedule.get_last_lr()[0]:.2e}  {time.perf_counter() - start:.0f}s")
        if checkpoint is not None and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            tmp = f"{checkpoint}.{os.getpid()}.tmp"
            torch.save({"steps": steps, "step": step + 1, "model": model.state_dict(),
                        "attribute_head": None if head is None else head.state_dict(),
                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "losses": losses}, tmp)
            os.replace(tmp, checkpoint)
        if callback is not None and callback_every and (step + 1) % callback_every == 0:
            callback(step + 1, model)
            model.train()
    bar.close()
    if world > 1:
        _check_in_step(model, world)
    for m, p in dropouts.items():
        m.p = p
    for p in held:  # a text encoder held fixed is an ordinary module again
        p.requires_grad_(True)
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    options = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
               "warmup": warmup, "clip_max_norm": clip_max_norm, "aux_loss": aux_loss, "dropout": dropout,
               "captions_per_image": captions_per_image, "all_objects_captions": all_objects_captions,
               "contrast_captions": contrast_captions, "similar_scenes": similar_scenes, "backbone": model.config.backbone,
               "text_pretrain_steps": text_pretrain_steps, "text_lr_scale": text_lr_scale,
               "attribute_loss": attribute_loss, "loss_weights": weights,
               "eos_coef": eos_coef, "bf16": bf16, "processes": world}
    return TrainResult(model, tokenizer, losses, time.perf_counter() - start, options)


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the initialized ``torch.distributed`` group, or (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_batch_split(batch_size: int, processes: int) -> None:
    if batch_size % processes:
        raise InputError(f"batch_size {batch_size} must be a multiple of the {processes} training processes")


def _check_in_step(model: nn.Module, world: int) -> None:
    """Raise unless every process ends with the same weights (a sum of all parameters compared)."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    every = [torch.zeros_like(total) for _ in range(world)]
    torch.distributed.all_gather(every, total)
    if any(not torch.equal(t, every[0]) for t in every):
        raise RuntimeError(f"the training processes ended with different weights: {[float(t) for t in every]}")


# ---------------------------------------------------------------- text pre-training


def pretrain_text_encoder(model, tokenizer, steps: int, seed: int = 0, lr: float = 1e-3, batch_size: int = 64,
                          log=None) -> list[float]:
    """Masked-language-model training of the text encoder alone on ShapesWorld captions.

    MDETR starts from a pre-trained RoBERTa, whose token features already say which word they
    are; a text encoder trained from scratch inside the detector has no reason to keep that
    apart ("red" and "blue" end up alike), and the detector then cannot bind words to objects.
    RoBERTa's recipe on this world's captions: 15 % of the tokens are chosen, 80 % of those
    masked, 10 % replaced by a random word, 10 % kept, and all of them predicted. The prediction
    head is thrown away afterwards; the model's parameter names do not change.
    """
    encoder = model.transformer.text_encoder
    hidden = encoder.embeddings.word_embeddings.embedding_dim
    vocab = encoder.embeddings.word_embeddings.num_embeddings
    generator = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, vocab))
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
    rng = np.random.Generator(np.random.PCG64([seed, 7]))
    special_ids = set(tokenizer.all_special_ids)
    special = torch.tensor(sorted(special_ids))
    words = torch.tensor([i for i in range(len(tokenizer)) if i not in special_ids])
    encoder.train()
    losses = []
    for step in range(steps):
        captions = []
        for s in rng.integers(0, TRAIN_SEEDS.stop, size=batch_size // 4):
            scene = shapesworld.make_scene(int(s))
            captions += [v.caption for v in caption_variants(scene, int(s), 4, all_objects=1)]
        enc = tokenize(tokenizer, captions)
        ids, attention = enc["input_ids"], enc["attention_mask"]
        maskable = attention.bool() & ~torch.isin(ids, special)
        chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & maskable
        roll = torch.rand(ids.shape, generator=generator)
        inputs = ids.clone()
        inputs[chosen & (roll < 0.8)] = tokenizer.mask_token_id
        swap = chosen & (roll >= 0.8) & (roll < 0.9)
        inputs[swap] = words[torch.randint(len(words), (int(swap.sum()),), generator=generator)]
        logits = head(encoder(inputs, attention))
        loss = F.cross_entropy(logits[chosen], ids[chosen])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % 100 == 0:
            log(f"text pre-training step {step + 1}/{steps}  masked-LM loss {np.mean(losses[-100:]):.3f}")
    return losses


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def ground_phrases(model, scenes: Sequence[shapesworld.Scene], tokenizer=None,
                   size: int = TOY_INPUT_SIZE) -> list[list[tuple[float, float, float, float]]]:
    """Per scene, per phrase: the box (xyxy pixels) of the query with the most softmax mass on
    the phrase's tokens."""
    tokenizer = tokenizer or model.get_tokenizer()
    batch = make_batch(scenes, tokenizer, size)
    device = next(model.parameters()).device
    out = model(images=batch.images.to(device), text={k: batch.text[k] for k in ("input_ids", "attention_mask")})
    prob = out["pred_logits"].float().softmax(-1).cpu()
    boxes = box_cxcywh_to_xyxy(out["pred_boxes"].float().cpu())
    result = []
    for i, (scene, t) in enumerate(zip(scenes, batch.targets)):
        width, height = scene.image.size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        picked = []
        for tokens in t["tokens"]:
            q = int(prob[i][:, tokens].sum(-1).argmax())
            picked.append(tuple(float(v) for v in boxes[i, q] * scale))
        result.append(picked)
    return result


def phrase_ious(model, scenes: Sequence[shapesworld.Scene], tokenizer=None,
                size: int = TOY_INPUT_SIZE) -> list[float]:
    """IoU of each phrase's grounded box (:func:`ground_phrases`) with its object's box, scene
    by scene, phrase by phrase."""
    ious = []
    for scene, boxes in zip(scenes, ground_phrases(model, scenes, tokenizer, size)):
        for phrase, box in zip(scene.phrases, boxes):
            gold = torch.tensor([scene.objects[phrase.object_index].box_xyxy])
            ious.append(float(box_iou(torch.tensor([box]), gold)[0][0, 0]))
    return ious


def evaluate(model, seeds: Iterable[int], tokenizer=None, batch_size: int = 64,
             size: int = TOY_INPUT_SIZE) -> dict:
    """Referring-expression accuracy at IoU ≥ 0.5 over every phrase of the given scenes."""
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
    return evaluate(model, seeds, tokenizer, batch_size)["accuracy"]


__all__ = ["TOY_INPUT_SIZE", "TOY_TOKENIZER", "TRAIN_SEEDS", "EVAL_SEED_START", "VALIDATION_SEED_START", "LOSS_WEIGHTS", "toy_config",
           "toy_tokenizer", "init_weights", "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_iou",
           "generalized_box_iou", "positive_map", "pretrain_text_encoder", "all_objects_caption", "contrast_caption", "training_scene", "phrase_token_lists", "caption_variants", "make_batch", "Batch",
           "HungarianMatcher", "SetCriterion", "forward_all_layers", "total_loss", "train", "TrainResult",
           "ground_phrases", "phrase_ious", "evaluate", "accuracy_iou50"]
