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
  tokens, both directions. Every loss is divided by the number of target boxes (of the whole
  batch, in a data-parallel run), and the same losses are applied to every decoder layer's
  output (DETR's auxiliary losses).

Only one detail differs from the reference: padding tokens are left out of the contrastive
softmax (the reference lets them compete as negatives, which only matters when captions of a
batch differ in length, as ShapesWorld's do). One term can be added that the reference does not
have: an **attribute loss** (``TrainConfig.attribute_loss``), a throw-away linear head asking
each matched query for its object's colour, shape and size. With MDETR's losses alone, the toy
never learns what colour words refer to within its training budget (docs/evaluation.md).

Modules: :mod:`.toy` (the toy model, tokenizer, seed ranges), :mod:`.data` (scenes, captions,
batches, positive maps), :mod:`.criterion` (matcher and losses), :mod:`.config` (every option of
a run), :mod:`.loop` (:func:`train`), :mod:`.checkpoint`, :mod:`.pretrain` (the text encoder's
masked-LM pre-training) and :mod:`.metrics` (:func:`accuracy_iou50` on held-out scenes).
"""
from .config import LOSS_WEIGHTS, TrainConfig
from .criterion import HungarianMatcher, SetCriterion, forward_all_layers, loss_divisor, total_loss
from .data import (ATTRIBUTES, Batch, all_objects_caption, caption_variants, contrast_caption, make_batch,
                   phrase_token_lists, positive_map, scene_tensor, training_batches, training_scene)
from .loop import TrainResult, train
from .metrics import accuracy_iou50, ground_phrases, grounding_accuracy, phrase_ious
from .pretrain import pretrain_text_encoder
from .toy import (EVAL_SEED_START, TOY_INPUT_SIZE, TOY_TOKENIZER, TRAIN_SEEDS, VALIDATION_SEED_START, init_weights,
                  toy_config, toy_tokenizer)

__all__ = ["TOY_INPUT_SIZE", "TOY_TOKENIZER", "TRAIN_SEEDS", "EVAL_SEED_START", "VALIDATION_SEED_START",
           "LOSS_WEIGHTS", "ATTRIBUTES", "TrainConfig", "toy_config", "toy_tokenizer", "init_weights",
           "positive_map", "pretrain_text_encoder", "all_objects_caption", "contrast_caption", "training_scene",
           "phrase_token_lists", "caption_variants", "scene_tensor", "make_batch", "training_batches", "Batch",
           "HungarianMatcher", "SetCriterion", "forward_all_layers", "total_loss", "loss_divisor", "train",
           "TrainResult", "ground_phrases", "phrase_ious", "grounding_accuracy", "accuracy_iou50"]
