"""The training state a run saves every few steps and resumes from: weights, optimizer, schedule,
losses so far, and the run's :class:`TrainConfig`, which a resuming run must match in full."""
from __future__ import annotations

import os

import torch

from .config import TrainConfig


def save_state(path: str, setup, config: TrainConfig, step: int, losses: list[float]) -> None:
    """Write the state after ``step`` steps atomically (a run killed while writing keeps the last one)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save({"config": config.as_dict(), "step": step, "model": setup.model.state_dict(),
                "attribute_head": None if setup.head is None else setup.head.state_dict(),
                "optimizer": setup.optimizer.state_dict(), "schedule": setup.schedule.state_dict(),
                "losses": list(losses)}, tmp)
    os.replace(tmp, path)


def read_state(path: str, config: TrainConfig) -> dict:
    """The state saved at ``path``; raises :class:`~mdetr_agf.errors.ResumeError` (before any
    work is done) unless it was written with exactly ``config``."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    config.check_resumes(saved.get("config"), path)
    return saved


def restore_state(saved: dict, setup) -> tuple[list[float], int]:
    """Load a state from :func:`read_state` into ``setup``; (losses so far, steps done)."""
    setup.model.load_state_dict(saved["model"])
    if setup.head is not None:
        setup.head.load_state_dict(saved["attribute_head"])
    setup.optimizer.load_state_dict(saved["optimizer"])
    setup.schedule.load_state_dict(saved["schedule"])
    return list(saved["losses"]), int(saved["step"])
