"""A checkpoint file -> weights, without ever running code from a downloaded pickle.

`load_weights` keeps a slim weights-only safetensors copy beside each Zenodo file, so only the
first load pays for unpickling gigabytes of optimizer state.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pickle
import re
import stat
import warnings
import zipfile
from pathlib import Path

from ..errors import CheckpointError, FileMissingError
from . import limits
from .safefs import private_folder
from .torch_zip import check_file

_SLIM_FORMAT = "mdetr_agf.slim/2"


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
    source's size, mtime and fingerprint (`source_fingerprint`), so replacing the source makes
    it stale, and a damaged one is rebuilt. Where no slim copy can be written (a read-only
    mount) or trusted (a folder every user can write to), loading works without one and warns.
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
        args = _plain_args(args, path)
        if use_ema and meta.get("key") != "model_ema":
            raise CheckpointError(
                f"{path} does not hold the EMA weights ('model_ema'); pass use_ema=False, or "
                "the .slim.ema.safetensors copy"
            )
        return state, args

    slim = slim_path(path, use_ema)
    shared = _open_to_all(path.parent)
    if not shared:
        stamp = {"source_size": str(st.st_size), "source_mtime_ns": str(st.st_mtime_ns),
                 "source_fingerprint": source_fingerprint(path)}
        cached = _read_slim(slim, key, stamp, path)
        if cached is not None:
            return cached

    try:
        check_file(path, keys=(key,))  # torch does not check the CRC-32 of what it maps
    except CheckpointError as e:
        raise CheckpointError(f"{e}; delete it and download it again") from None
    ckpt = read_checkpoint(path)
    if key not in ckpt:
        raise CheckpointError(
            f"{path} has no {key!r} entry (use_ema={use_ema}); its entries: "
            f"{', '.join(sorted(map(str, ckpt)))}"
        )
    state = _tensors(ckpt[key], path, key)
    args = _plain_args(ckpt.get("args"), path)
    if shared:
        warnings.warn(
            f"{path.parent} is writable by every user, so no slim copy of {path.name} is kept or "
            "trusted there (anyone could plant one); every load unpickles the full checkpoint. "
            "Move the file to a folder of your own to load it faster",
            stacklevel=2,
        )
    else:
        _write_slim(slim, state, args, key, stamp)
    return state, args


def slim_path(path: Path, use_ema: bool = False) -> Path:
    """Where the slim copy of checkpoint `path` lives: beside it."""
    return path.with_name(path.name + (".slim.ema.safetensors" if use_ema else ".slim.safetensors"))


def _open_to_all(folder: Path) -> bool:
    try:
        return bool(os.stat(folder).st_mode & stat.S_IWOTH)
    except OSError:
        return False


def source_fingerprint(path: Path) -> str:
    """A digest that changes whenever the checkpoint's content does, even at equal size and mtime.

    A zip checkpoint (every torch >= 1.6 file) is fingerprinted by its central directory:
    each member's name, CRC-32, size and offset, read from the end of the file, about 100
    bytes per tensor (under 1 MB for a Zenodo file), so the check costs no full read. Torch
    also stores a per-save serialization id as a member, so even an identical re-save
    differs. Older (pickle-only) files are hashed whole.
    """
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                h.update(f"{info.filename}\0{info.CRC}\0{info.file_size}\0"
                         f"{info.header_offset}\n".encode())
        return "zip-cd:" + h.hexdigest()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        pass
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    return "sha256:" + h.hexdigest()


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


class _TooBig(Exception):
    pass


def _plain_args(args, path: Path) -> dict:
    """Training options as JSON-safe data (the same dict whether read fresh or from slim).

    Each option is converted within a nesting depth ($MDETR_AGF_ARGS_MAX_DEPTH) and a JSON
    size ($MDETR_AGF_ARGS_MAX_BYTES): shared references in a tiny pickle could otherwise
    expand without bound, and deep nesting overflow the stack. Options beyond the bounds are
    dropped with a warning; the weights do not depend on them.
    """
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        return {}
    max_depth, budget = int(limits.ARGS_DEPTH.get()), [int(limits.ARGS_BYTES.get())]
    out, dropped = {}, []
    for key, value in args.items():
        key = str(key)[:200]
        trial = [budget[0]]
        try:
            out[key] = _plain(value, max_depth, trial)
            budget[0] = trial[0]
        except _TooBig:
            dropped.append(key)
    if dropped:
        warnings.warn(
            f"{path}: training option(s) {', '.join(dropped[:10])}"
            f"{' …' if len(dropped) > 10 else ''} dropped: nested deeper than {max_depth} levels "
            f"or over {limits.ARGS_BYTES.get():g} bytes as JSON (raise "
            f"${limits.ARGS_DEPTH.env} / ${limits.ARGS_BYTES.env} if you trust the file); the "
            "weights are unaffected",
            stacklevel=3,
        )
    return out


def _plain(value, depth: int, budget: list):
    """`value` as JSON data, charging `budget[0]` for every byte it would take."""
    def charge(n):
        budget[0] -= n
        if budget[0] < 0:
            raise _TooBig

    if value is None or isinstance(value, (bool, float)):
        charge(8)
        return value
    if isinstance(value, int):
        charge(value.bit_length() // 3 + 2)
        return int(value)
    if isinstance(value, str):
        charge(len(value) + 2)
        return value
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, (dict, list, tuple)):
        if depth <= 0:
            raise _TooBig
        charge(2)
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                k = k if isinstance(k, str) else str(k) if isinstance(k, (int, float, bool)) \
                    or k is None else None
                if k is None:
                    raise _TooBig  # a key JSON cannot hold
                charge(len(k) + 4)
                out[k] = _plain(v, depth - 1, budget)
            return out
        return [_plain(v, depth - 1, budget) for v in value]
    text = object.__repr__(value) if not isinstance(value, (bytes, bytearray)) else None
    try:
        import torch

        if isinstance(value, torch.Tensor):
            text = f"tensor(shape={list(value.shape)}, dtype={value.dtype})"
    except ImportError:  # pragma: no cover
        pass
    if text is None:
        charge(len(value) * 4 + 3)
        text = str(value)
    charge(len(text) + 2)
    return text


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
    try:
        order = json.loads(meta.get("order", "[]"))  # safetensors sorts keys; dicts are ordered
        args = json.loads(meta.get("args", "{}"))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"cannot read {path}: its metadata is corrupt ({type(e).__name__});"
                              " delete it") from None
    if isinstance(order, list) and sorted(map(str, order)) == sorted(tensors):
        tensors = {k: tensors[k] for k in order}
    return tensors, args, meta


def _read_slim(slim: Path, key: str, stamp: dict, path: Path):
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
    return state, _plain_args(args, path)


def save_slim(slim: Path, state: dict, args: dict, key: str, stamp: dict) -> None:
    """Write a slim copy in a private temp folder, then rename; `stamp` says what it was made from."""
    from safetensors.torch import save_file

    meta = {"format": "pt", "format_version": _SLIM_FORMAT, "key": key,
            "args": json.dumps(args), "order": json.dumps(list(state)), **stamp}
    with private_folder(slim.parent) as tmp:
        save_file(state, str(tmp / slim.name), metadata=meta)
        os.replace(tmp / slim.name, slim)


def _write_slim(slim: Path, state: dict, args: dict, key: str, stamp: dict) -> None:
    """A read-only folder only costs speed: later loads unpickle the source again."""
    try:
        save_slim(slim, state, args, key, stamp)
    except Exception as e:  # OSError, or safetensors' own error type for I/O failures
        warnings.warn(
            f"no slim copy {slim} could be written ({e}); loading works, but every load "
            "unpickles the full checkpoint",
            stacklevel=3,
        )
