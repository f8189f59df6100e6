"""MDETR's objective: Hungarian matching of queries to target boxes, and the losses of one set of
outputs (soft tokens, L1 and GIoU boxes, contrastive alignment, and the toy's attribute loss),
summed over every decoder layer."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from .config import LOSS_WEIGHTS
from .data import ATTRIBUTES, Batch


class HungarianMatcher:
    """One-to-one assignment of queries to target boxes minimizing MDETR's matching cost (its
    ``--set_cost_class``, ``--set_cost_bbox``, ``--set_cost_giou`` by default)."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, target_boxes: torch.Tensor,
                    target_map: torch.Tensor) -> torch.Tensor:
        """(queries, targets) cost: logits (Q, 256), boxes (Q, 4) cxcywh; target_map (T, 256)."""
        prob = logits.softmax(-1)
        cost_class = -(prob @ target_map.T)
        cost_bbox = torch.cdist(boxes, target_boxes, p=1)
        cost_giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                         box_convert(target_boxes, "cxcywh", "xyxy"))
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
        giou = torch.diag(generalized_box_iou(box_convert(pred, "cxcywh", "xyxy"), box_convert(gold, "cxcywh", "xyxy")))
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
                attention_mask: torch.Tensor, num_boxes: float | None = None) -> dict:
        """The losses, each divided by ``num_boxes`` (default: the targets' box count; a
        data-parallel process passes :func:`loss_divisor` of the whole batch)."""
        indices = self.matcher(outputs, targets, positive_map)
        if num_boxes is None:
            num_boxes = max(box_count(targets), 1.0)
        losses = {"loss_ce": self.loss_labels(outputs, targets, positive_map, indices, num_boxes)}
        losses["loss_bbox"], losses["loss_giou"] = self.loss_boxes(outputs, targets, indices, num_boxes)
        if "proj_queries" in outputs:
            losses["loss_contrastive_align"] = self.loss_contrastive_align(
                outputs, targets, indices, num_boxes, attention_mask)
        if self.attribute_head is not None:
            losses["loss_attributes"] = self.loss_attributes(outputs, targets, indices, num_boxes)
        return losses


def forward_all_layers(model, images, text, repeats: int = 1) -> list[dict]:
    """The heads applied to every decoder layer's output (last layer last), as MDETR's aux loss.

    ``repeats``: captions per image (``text`` holds ``len(images) · repeats`` captions).
    """
    cache = model.encode(images, text, repeats=repeats)
    states = model.decode(cache)
    return [model.heads(states[: k + 1], cache) for k in range(len(states))]


def total_loss(criterion: SetCriterion, outputs_per_layer: list[dict], batch: Batch,
               weights: Mapping = LOSS_WEIGHTS, num_boxes: float | None = None) -> tuple[torch.Tensor, dict]:
    """Weighted sum of every layer's losses, and the last layer's unweighted losses (for logs)."""
    total, last = 0.0, {}
    for outputs in outputs_per_layer:
        last = criterion(outputs, batch.targets, batch.positive_map, batch.text["attention_mask"], num_boxes)
        total = total + sum(weights[k] * v for k, v in last.items())
    return total, {k: float(v.detach()) for k, v in last.items()}


def box_count(targets: Sequence[dict]) -> float:
    """How many target boxes ``targets`` hold."""
    return float(sum(len(t["boxes"]) for t in targets))


def loss_divisor(batch: Batch, world: int = 1) -> float:
    """The loss divisor: the target boxes of the whole batch per process (MDETR's ``num_boxes``).

    In a data-parallel job each process's losses are divided by this (the batch's count summed
    over the processes, divided by their number), so that the gradient DistributedDataParallel
    averages is the one a single process computes over the whole batch."""
    count = box_count(batch.targets)
    if world > 1:
        total = torch.tensor([count], dtype=torch.float64)
        torch.distributed.all_reduce(total)
        count = float(total) / world
    return max(count, 1.0)
