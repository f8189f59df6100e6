"""Every option of a toy training run in one frozen value, saved with each checkpoint and
compared in full when a run resumes from one: a run continued with other options would end
somewhere no uninterrupted run goes."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import InputError, ResumeError
from .toy import TRAIN_SEEDS

#: MDETR's loss weights (``--ce_loss_coef``, ``--bbox_loss_coef``, ``--giou_loss_coef``,
#: ``--contrastive_align_loss_coef``).
LOSS_WEIGHTS = MappingProxyType({"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_contrastive_align": 1.0})


@dataclass(frozen=True)
class TrainConfig:
    """A training run's options (seeded: the same options give the same weights).

    ``scene_seeds``: the scenes batches are drawn from, shuffled by ``seed`` and walked through
    epoch by epoch. ``clip_max_norm`` 0.1 and ``weight_decay`` 1e-4 are MDETR's; the learning
    rate is higher than its 1e-4 because nothing here is pre-trained. ``dropout`` replaces every
    dropout probability while training (0: every scene is new, nothing to overfit; None: keep
    the model's 0.1). ``channels_last`` only changes the memory layout (faster CPU convolutions);
    ``bf16`` runs the forward pass under bfloat16 autocast (weights, losses and matching stay
    float32), about 1.6× faster on CPUs with AVX512-BF16. ``threads``: torch threads (None: leave
    the setting alone). ``processes``: the data-parallel processes the run is started in
    (torchrun); each trains on ``batch_size / processes`` of every step's images.

    ``captions_per_image`` > 1 adds captions of each image (:func:`caption_variants`), of which
    ``all_objects_captions`` name every object and ``contrast_captions`` refer to objects whose
    shape repeats; the backbone still sees each image once per step. ``similar_scenes``: the
    share of scenes drawn from one or two shapes (:func:`training_scene`). ``backbone``,
    ``enc_layers``, ``dec_layers``: the toy model (:func:`toy_config`; backbone "small_cnn" or
    "small_cnn_s16"). ``text_pretrain_steps`` > 0 first trains the text encoder alone as a masked
    language model (:func:`pretrain_text_encoder`), as MDETR starts from a pre-trained RoBERTa;
    ``text_lr_scale`` multiplies its learning rate afterwards (MDETR: 0.5; 0 holds it fixed, which
    keeps the word identities the pre-training gave it). ``attribute_loss`` > 0 adds, with that
    weight, a loss that is not MDETR's (:meth:`SetCriterion.loss_attributes`); without it the toy
    never learns colour (docs/evaluation.md). ``loss_weights`` and ``eos_coef`` weigh MDETR's
    losses; ``aux_loss`` applies them to every decoder layer.
    """

    steps: int = 11500
    seed: int = 0
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 200
    clip_max_norm: float = 0.1
    scene_seeds: range | tuple[int, ...] = TRAIN_SEEDS
    captions_per_image: int = 4
    all_objects_captions: int = 0
    contrast_captions: int = 0
    similar_scenes: float = 0.0
    backbone: str = "small_cnn"
    enc_layers: int = 2
    dec_layers: int = 2
    text_pretrain_steps: int = 0
    text_lr_scale: float = 1.0
    attribute_loss: float = 0.0
    loss_weights: Mapping[str, float] = field(default_factory=lambda: LOSS_WEIGHTS)
    eos_coef: float = 0.1
    aux_loss: bool = True
    dropout: float | None = 0.0
    channels_last: bool = True
    bf16: bool = False
    threads: int | None = None
    processes: int = 1

    def __post_init__(self):
        for name in ("steps", "batch_size", "captions_per_image", "processes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be an int >= 1, got {value!r}")
        if self.batch_size % self.processes:
            raise InputError(f"batch_size {self.batch_size} must be a multiple of the {self.processes} training "
                             "processes")
        seeds = self.scene_seeds if isinstance(self.scene_seeds, range) else tuple(int(s) for s in self.scene_seeds)
        if len(seeds) == 0:
            raise InputError("scene_seeds is empty; pass the seeds of the scenes to train on")
        object.__setattr__(self, "scene_seeds", seeds)
        object.__setattr__(self, "loss_weights", MappingProxyType(dict(self.loss_weights)))

    def as_dict(self) -> dict:
        """The options as plain data (what a checkpoint and the weights' metadata store)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        seeds = self.scene_seeds
        out["scene_seeds"] = ({"start": seeds.start, "stop": seeds.stop, "step": seeds.step}
                              if isinstance(seeds, range) else list(seeds))
        out["loss_weights"] = dict(self.loss_weights)
        return out

    def check_resumes(self, saved: Mapping | None, path) -> None:
        """Raise :class:`ResumeError` unless ``saved`` (a checkpoint's options) equals these in full."""
        if saved is None:
            raise ResumeError(f"{path} holds no training options (an older format); delete it to start over")
        mine = self.as_dict()
        differ = sorted(k for k in set(mine) | set(saved) if mine.get(k, "(none)") != saved.get(k, "(none)"))
        if differ:
            listed = "; ".join(f"{k}: {saved.get(k, '(none)')!r} there, {mine.get(k, '(none)')!r} here" for k in differ)
            raise ResumeError(f"{path} was written by a run with other options ({listed}); resume it with the "
                              "options it was written with, or pass another checkpoint (or delete it) to start over")
