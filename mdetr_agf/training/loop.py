"""The training loop: AdamW over MDETR's losses, seeded and deterministic, in one process or
data-parallel in every process of a torchrun job; checkpoints to resume from."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..models.build import build_model
from .checkpoint import read_state, restore_state, save_state
from .config import TrainConfig
from .criterion import SetCriterion, forward_all_layers, loss_divisor, total_loss
from .data import ATTRIBUTES, Batch, prefetch, training_batches
from .pretrain import pretrain_text_encoder
from .toy import init_weights, toy_config, toy_tokenizer


@dataclass
class TrainResult:
    model: nn.Module
    tokenizer: object
    losses: list[float]  # total loss per step
    seconds: float
    options: dict  # the run's TrainConfig as plain data


@dataclass
class _Setup:
    """What one run trains with: the optimizer and schedule, the losses, and what is changed on
    the model for training (held parameters, dropout probabilities) to put back afterwards."""
    model: nn.Module
    head: nn.Module | None
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    criterion: SetCriterion
    weights: dict
    held: list
    dropouts: dict
    memory_format: torch.memory_format


def train(config: TrainConfig | None = None, *, model: nn.Module | None = None, tokenizer=None,
          progress: bool = True, log_every: int = 0, log=print, callback=None, callback_every: int = 0,
          checkpoint: str | None = None, checkpoint_every: int = 500) -> TrainResult:
    """Train a (toy) MDETR on ShapesWorld scenes as ``config`` (:class:`TrainConfig`) says.

    ``model`` and ``tokenizer`` default to a fresh :func:`toy_config` model (the config's
    backbone and layers) and :func:`toy_tokenizer`; the model is handed back with its own
    dropout probabilities, in eval mode. ``callback(step, model)`` runs every ``callback_every``
    steps (e.g. a validation score). ``checkpoint``: a file to save the training state and the
    config to every ``checkpoint_every`` steps, and to resume from when it exists; a checkpoint
    written with other options is refused (:class:`~mdetr_agf.errors.ResumeError`), and a
    resumed run ends where an uninterrupted one would, up to float rounding.

    Data-parallel: called in every process of a torchrun job with an initialized
    ``torch.distributed`` group of ``config.processes`` (``torchrun --nproc_per_node=2
    scripts/train_toy.py``, which joins it with :func:`mdetr_agf.distributed.join`), each process
    draws the same batches and trains on its share of each batch's images; the losses are divided
    by the whole batch's box count and DistributedDataParallel averages the gradients, so the
    weights are a single process's over the same batches (up to float rounding), and a check at
    the end raises unless every process ends with the same weights. One process per CPU core uses
    the cores better than threads do here (two threads are no faster than one, two processes
    1.6×). Only process 0 logs, shows progress, calls ``callback`` and writes ``checkpoint``.
    """
    config = TrainConfig() if config is None else config
    rank, world = _process_group()
    if world != config.processes:
        raise InputError(f"the config asks for {config.processes} training process(es) but this job has {world}; "
                         f"start it with torchrun --nproc_per_node={config.processes}, or set processes={world}")
    saved = read_state(checkpoint, config) if checkpoint is not None and os.path.exists(checkpoint) else None
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    tokenizer = toy_tokenizer() if tokenizer is None else tokenizer
    model = _toy_model(config, tokenizer) if model is None else _checked_model(config, model)
    model.tokenizer = tokenizer
    if config.text_pretrain_steps:
        pretrain_text_encoder(model, tokenizer, config.text_pretrain_steps, seed=config.seed, lr=config.lr,
                              log=log if log_every and rank == 0 else None)
    setup = _set_up(config, model)
    losses, first = [], 0
    if saved is not None:
        losses, first = restore_state(saved, setup)
        log(f"resumed from {checkpoint} at step {first}")
    if rank:
        progress, log_every, callback, checkpoint = False, 0, None, None
    start = time.perf_counter()
    _loop(setup, config, training_batches(config, tokenizer, first, rank, world), losses, first, world,
          progress=progress, log=log, log_every=log_every, callback=callback, callback_every=callback_every,
          checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    if world > 1:
        _check_in_step(model, world)
    _put_back(setup)
    return TrainResult(model, tokenizer, losses, time.perf_counter() - start, config.as_dict())


def _toy_model(config: TrainConfig, tokenizer) -> nn.Module:
    return init_weights(build_model(toy_config(len(tokenizer), backbone=config.backbone,
                                               enc_layers=config.enc_layers, dec_layers=config.dec_layers)))


def _checked_model(config: TrainConfig, model: nn.Module) -> nn.Module:
    """A model handed in must be the one the config describes, so the saved config is true of it."""
    mine = (model.config.backbone, model.config.enc_layers, model.config.dec_layers)
    if mine != (config.backbone, config.enc_layers, config.dec_layers):
        raise InputError(f"the model has backbone, enc_layers, dec_layers {mine} but the config says "
                         f"{(config.backbone, config.enc_layers, config.dec_layers)}; pass a config that "
                         "describes the model")
    return model


def _set_up(config: TrainConfig, model: nn.Module) -> _Setup:
    """The optimizer (two weight-decay groups each for the text encoder and the rest), schedule
    and losses, with the model made ready to train (text encoder held, dropout, memory layout)."""
    held = ([p for p in model.transformer.text_encoder.parameters() if p.requires_grad]
            if config.text_lr_scale == 0 else [])
    for p in held:  # the pre-trained text encoder is held fixed: no gradients to compute
        p.requires_grad_(False)
    groups = []
    for text in (False, True):
        named = [(n, p) for n, p in model.named_parameters()
                 if n.startswith("transformer.text_encoder.") == text and p.requires_grad]
        lr = config.lr * (config.text_lr_scale if text else 1.0)
        groups += [{"params": [p for n, p in named if _decayed(n, p)], "weight_decay": config.weight_decay, "lr": lr},
                   {"params": [p for n, p in named if not _decayed(n, p)], "weight_decay": 0.0, "lr": lr}]
    head = None
    if config.attribute_loss:  # a training aid only: it is thrown away with the optimizer
        head = nn.Linear(model.config.hidden_dim, sum(len(v) for v in ATTRIBUTES.values()))
        groups.append({"params": list(head.parameters()), "weight_decay": 0.0, "lr": config.lr})
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
    warmup = min(config.warmup, config.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config.steps, warmup))
    weights = dict(config.loss_weights)
    if head is not None:
        weights["loss_attributes"] = config.attribute_loss
    dropouts = {m: m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    if config.dropout is not None:
        for m in dropouts:
            m.p = config.dropout
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    model.train()
    return _Setup(model, head, optimizer, schedule, SetCriterion(eos_coef=config.eos_coef, attribute_head=head),
                  weights, held, dropouts, memory_format)


def _decayed(name: str, parameter: nn.Parameter) -> bool:
    """Weight decay on matrices and kernels, not on biases, norms or embeddings (as DETR)."""
    return parameter.ndim > 1 and "embeddings" not in name


def _put_back(setup: _Setup) -> None:
    """The model as it came, less the trained weights: dropout, trainable text encoder, layout, eval."""
    for m, p in setup.dropouts.items():
        m.p = p
    for p in setup.held:
        p.requires_grad_(True)
    setup.model.to(memory_format=torch.contiguous_format)
    setup.model.eval()


class _StepLoss(nn.Module):
    """One step's forward and loss as a module, so that DistributedDataParallel, which hooks a
    module's forward, averages the gradients of everything it trains (model and attribute head)."""

    def __init__(self, setup: _Setup, config: TrainConfig):
        super().__init__()
        self.model, self.criterion, self.weights = setup.model, setup.criterion, setup.weights
        self.memory_format, self.aux_loss, self.bf16 = setup.memory_format, config.aux_loss, config.bf16

    def forward(self, batch: Batch, num_boxes: float):
        images = batch.images.contiguous(memory_format=self.memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            outputs = forward_all_layers(self.model, images, batch.text, batch.repeats)
        if self.bf16:  # the losses and the matching in float32
            outputs = [{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in o.items()}
                       for o in outputs]
        return total_loss(self.criterion, outputs if self.aux_loss else outputs[-1:], batch, self.weights, num_boxes)


def _loop(setup: _Setup, config: TrainConfig, batches, losses: list, first: int, world: int, *, progress, log,
          log_every, callback, callback_every, checkpoint, checkpoint_every) -> None:
    """Steps ``first`` … ``config.steps − 1``, appending each step's loss (the whole batch's) to ``losses``."""
    from tqdm.auto import tqdm

    bar = tqdm(prefetch(batches), initial=first, total=config.steps, disable=not progress, desc="training",
               dynamic_ncols=True)
    runner = _StepLoss(setup, config)
    if world > 1:  # the gradients are averaged over the processes during backward, in buckets
        runner = nn.parallel.DistributedDataParallel(runner, find_unused_parameters=True)
    trained = [p for m in (setup.model, setup.head) if m is not None for p in m.parameters()]
    start = time.perf_counter()
    for step, batch in enumerate(bar, start=first):
        loss, parts = runner(batch, loss_divisor(batch, world))
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_max_norm:
            nn.utils.clip_grad_norm_(trained, config.clip_max_norm)
        setup.optimizer.step()
        setup.schedule.step()
        if world > 1:  # the loss of the whole batch, for the logs
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}", ce=f"{parts['loss_ce']:.2f}", giou=f"{parts['loss_giou']:.2f}")
        done = step + 1
        if log_every and done % log_every == 0:
            log(f"step {done}/{config.steps}  loss {float(np.mean(losses[-log_every:])):.4f}  "
                + "  ".join(f"{k[5:]} {v:.3f}" for k, v in parts.items())
                + f"  lr {setup.schedule.get_last_lr()[0]:.2e}  {time.perf_counter() - start:.0f}s")
        if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < config.steps:
            save_state(checkpoint, setup, config, done, losses)
        if callback is not None and callback_every and done % callback_every == 0:
            callback(done, setup.model)
            setup.model.train()
    bar.close()


def _lr_factor(step: int, steps: int, warmup: int, final: float = 0.02) -> float:
    """Linear warm-up, then cosine decay to ``final`` × the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))


def _process_group() -> tuple[int, int]:
    """(rank, world size) of the initialized ``torch.distributed`` group, or (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_in_step(model: nn.Module, world: int) -> None:
    """Raise unless every process ends with the same weights (a sum of all parameters compared)."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    every = [torch.zeros_like(total) for _ in range(world)]
    torch.distributed.all_gather(every, total)
    if any(not torch.equal(t, every[0]) for t in every):
        raise RuntimeError(f"the training processes ended with different weights: {[float(t) for t in every]}")
