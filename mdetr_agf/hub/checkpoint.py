"""A checkpoint file -> weights, without ever running code from a downloaded pickle.

`load_weights` keeps a slim weights-only safetensors copy beside each Zenodo file, so only the
first load pays for unpickling gigabytes of optimizer state.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import re
import warnings
from pathlib import Path

from ..errors import CheckpointError, FileMissingError

_SLIM_FORMAT = "mdetr_agf.slim/1"


def read_checkpoint(path) -> dict:
    """Unpickle a checkpoint with torch's weights-only loader; nothing else is ever tried.

    Only tensors, containers, primitives and `argparse.Namespace` (the training options in
    every MDETR file) are allowed. Anything else is refused before it is constructed, so a
    malicious file cannot run code here. Memory-mapped where the format allows, so the
    optimizer state that fills most of a Zenodo file is never read into memory.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileMissingError(errno.ENOENT, "checkpoint file not found", str(path))

    if not hasattr(torch.serialization, "safe_globals"):
        raise CheckpointError(
            f"reading {path} safely needs torch >= 2.5 (to allow argparse.Namespace in the "
            f"weights-only loader); this is torch {torch.__version__}: upgrade torch"
        )

    def load(mmap: bool):
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            ckpt = load(mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            ckpt = load(mmap=False)  # legacy (pre-zip) format: cannot be mapped
    except pickle.UnpicklingError as e:
        m = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", str(e))
        detail = m.group(1).strip() if m else str(e).splitlines()[0]
        raise CheckpointError(
            f"refused to load {path}: it asks to build something other than tensors and "
            f"plain data ({detail}). Nothing from it was executed. Only load such a file "
            "with another tool if you trust its source; if it should be an MDETR checkpoint, "
            "it is corrupt: delete it and download it again."
        ) from None
    except Exception as e:  # zip/EOF/garbage errors from torch: the file is damaged
        raise CheckpointError(
            f"cannot read {path}: the file is truncated or corrupt "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unexpected end'}); "
            "delete it and download it again"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        found = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not an MDETR checkpoint: expected a dict with a 'model' state dict, "
            f"found {found}"
        )
    return ckpt


def load_weights(path, *, use_ema: bool = False) -> tuple[dict, dict]:
    """(state dict, training args as a plain dict) of a Zenodo-format checkpoint.

    `use_ema` picks the exponential-moving-average weights ("model_ema"), the ones upstream
    evaluates with `--ema`. The first call writes `<path>.slim[.ema].safetensors` beside the
    file; later calls map that instead of unpickling gigabytes. The slim copy records the
    source's size and mtime, so replacing the source makes it stale and it is rebuilt.
    A `.safetensors` path (such a slim copy, kept without its 3 GB source) is read directly.
    """
    path = Path(path)
    key = "model_ema" if use_ema else "model"
    try:
        st = path.stat()
    except OSError as e:
        raise FileMissingError(errno.ENOENT, "checkpoint file not found", str(path)) from e
    if path.suffix == ".safetensors":
        state, args, meta = _read_safetensors(path)
        if use_ema and meta.get("key") != "model_ema":
            raise CheckpointError(
                f"{path} does not hold the EMA weights ('model_ema'); pass use_ema=False, or "
                "the .slim.ema.safetensors copy"
            )
        return state, args

    slim = path.with_name(path.name + (".slim.ema.safetensors" if use_ema else ".slim.safetensors"))
    stamp = {"source_size": str(st.st_size), "source_mtime_ns": str(st.st_mtime_ns)}
    cached = _read_slim(slim, key, stamp)
    if cached is not None:
        return cached

    ckpt = read_checkpoint(path)
    if key not in ckpt:
        raise CheckpointError(
            f"{path} has no {key!r} entry (use_ema={use_ema}); its entries: "
            f"{', '.join(sorted(map(str, ckpt)))}"
        )
    state = _tensors(ckpt[key], path, key)
    args = _plain_args(ckpt.get("args"))
    _write_slim(slim, state, args, key, stamp)
    return state, args


def _tensors(state, path: Path, key: str) -> dict:
    """Contiguous tensors with unshared storage: what safetensors can store."""
    import torch

    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {key!r} is a {type(state).__name__}, not a state dict")
    out, seen = {}, set()
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(
                f"{path}: {key}[{name!r}] is a {type(t).__name__}, not a tensor"
            )
        t = t.detach().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[str(name)] = t
    return out


def _plain_args(args) -> dict:
    """Training options as JSON-safe data (the same dict whether read fresh or from slim)."""
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        return {}
    return json.loads(json.dumps(args, default=str))


def _read_safetensors(path: Path) -> tuple[dict, dict, dict]:
    """(state in its original order, args, metadata) of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors reports damage with several exception types
        raise CheckpointError(
            f"cannot read {path}: the file is truncated or corrupt ({e}); delete it"
        ) from None
    order = json.loads(meta.get("order", "[]"))  # safetensors sorts keys; state dicts are ordered
    if sorted(order) == sorted(tensors):
        tensors = {k: tensors[k] for k in order}
    return tensors, json.loads(meta.get("args", "{}")), meta


def _read_slim(slim: Path, key: str, stamp: dict):
    """The slim copy's (state, args) if it was made from this very source, else None."""
    if not slim.is_file():
        return None
    try:
        state, args, meta = _read_safetensors(slim)
    except CheckpointError:
        return None  # a damaged slim copy is only a cache: rebuild it from the source
    if (
        meta.get("format_version") != _SLIM_FORMAT
        or meta.get("key") != key
        or any(meta.get(k) != v for k, v in stamp.items())
    ):
        return None
    return state, args


def _write_slim(slim: Path, state: dict, args: dict, key: str, stamp: dict) -> None:
    """Write atomically (temp file + rename); a read-only folder only costs speed."""
    from safetensors.torch import save_file

    tmp = slim.with_name(f"{slim.name}.{os.getpid()}.tmp")
    meta = {"format": "pt", "format_version": _SLIM_FORMAT, "key": key,
            "args": json.dumps(args), "order": json.dumps(list(state)), **stamp}
    try:
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, slim)
    except Exception as e:  # OSError, or safetensors' own error type for I/O failures
        tmp.unlink(missing_ok=True)
        warnings.warn(
            f"could not write the slim copy {slim} ({e}); loading works, but every load "
            "will unpickle the full checkpoint",
            stacklevel=3,
        )
