"""Published checkpoints: which exist, where they live, how to fetch and open them safely.

`checkpoints.json` is the one place that names a checkpoint: adding a model means adding an
entry there, not code. This module turns a name into a local file (downloading it once into a
cache) and a file into weights, without ever running code from a downloaded pickle.

The Zenodo files are 0.4–3 GB and mostly optimizer state, so the downloader resumes instead of
restarting, and `load_weights` keeps a slim weights-only safetensors copy beside each file so
that only the first load pays for unpickling it.

torch is imported inside the functions that need it: listing, resolving and downloading
checkpoints (and the worker processes of a parallel download) stay light.
"""
from __future__ import annotations

import argparse
import copy
import errno
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import tarfile
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
import urllib3
from tqdm.auto import tqdm

from .errors import CheckpointError, DownloadError, FileMissingError, UnknownNameError

try:  # POSIX only; elsewhere concurrent downloads of one file are simply not coordinated.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

CACHE_ENV = "MDETR_AGF_CACHE"
MIRROR_ENV = "MDETR_AGF_MIRROR"

_PACKAGE_DIR = Path(__file__).resolve().parent
_REGISTRY_FILE = _PACKAGE_DIR / "checkpoints.json"
_SLIM_FORMAT = "mdetr_agf.slim/1"
# Tries per download call: a dropped connection that delivered bytes is resumed at once, so a
# flaky link costs a retry, not the whole file. Attempts that deliver nothing are not retried.
_ATTEMPTS = 3


# ---------------------------------------------------------------- registry


def cache_dir() -> Path:
    """Where downloads go: $MDETR_AGF_CACHE, else $XDG_CACHE_HOME/mdetr_agf (~/.cache/mdetr_agf).

    Created on demand so that merely importing the package never touches the disk.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base).expanduser() / "mdetr_agf"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=1)
def _registry_file() -> dict:
    with open(_REGISTRY_FILE, encoding="utf-8") as f:
        return json.load(f)


def registry() -> dict[str, dict]:
    """Model name -> entry of checkpoints.json (parsed once; callers get their own copy)."""
    return {e["name"]: copy.deepcopy(e) for e in _registry_file()["models"]}


def assets() -> dict[str, dict]:
    """Non-model files the models need (e.g. the GQA answer vocabularies), by name."""
    return {e["name"]: copy.deepcopy(e) for e in _registry_file().get("assets", [])}


def get_entry(name: str) -> dict:
    """The registry entry of `name`; an unknown name lists the valid ones."""
    models = registry()
    try:
        return models[name]
    except (KeyError, TypeError):
        raise UnknownNameError(
            f"no checkpoint named {name!r}; known names: {', '.join(sorted(models))}"
        ) from None


def _source_url(url: str) -> str:
    """Apply $MDETR_AGF_MIRROR: one folder holding the Zenodo files under their own names.

    It replaces the `https://zenodo.org/record/<id>/files/` prefix of every registry URL
    (the checkpoints' record 4721981 and the annotations' record), so an offline site or a
    test needs one server, not one per record.
    """
    mirror = os.environ.get(MIRROR_ENV)
    m = re.match(r"https://zenodo\.org/records?/\d+/files/", url)
    if mirror and m:
        return mirror.rstrip("/") + "/" + url[m.end():]
    return url


def resolve(name: str, checkpoint=None, *, progress: bool = True) -> Path:
    """A local file holding the weights of model `name`.

    `checkpoint` (a path) wins when given: it must exist, since silently downloading 3 GB
    because of a typo would be worse than an error. Otherwise entries without a URL are
    bundled inside the package, and the others are downloaded once into `cache_dir()`.
    """
    entry = get_entry(name)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileMissingError(
                errno.ENOENT,
                f"checkpoint file for {name!r} not found; pass an existing file, or no "
                f"checkpoint to download {entry['file']}",
                str(path),
            )
        return path
    if entry.get("url") is None:
        path = _PACKAGE_DIR / entry["file"]
        if not path.is_file():
            raise FileMissingError(
                errno.ENOENT,
                f"the weights bundled with the package for {name!r} are missing; reinstall "
                "mdetr-agf",
                str(path),
            )
        return path
    path = cache_dir() / entry["file"]
    if path.is_file():
        return path
    return download(_source_url(entry["url"]), path, sha256=entry.get("sha256"), progress=progress)


def resolve_asset(name: str, *, progress: bool = True) -> Path:
    """A local copy of an asset, or of one file inside an archive asset.

    `name` is an asset's name (gives the file as published) or one of its `members`, with or
    without the extension (e.g. "gqa_answer2id_by_type"). The archive is downloaded once;
    all listed members are extracted in the same pass to `cache_dir()`/<asset>/<member>, so
    asking for the next one costs nothing.
    """
    entry, member = _find_asset(name)
    archive = cache_dir() / entry["file"]
    target = archive if member is None else cache_dir() / entry["name"] / member
    if target.is_file():
        return target
    if not archive.is_file():
        download(_source_url(entry["url"]), archive, sha256=entry.get("sha256"), progress=progress)
    if member is None:
        return archive
    _extract(archive, entry["members"], target.parent)
    if not target.is_file():
        elsewhere = ", ".join(entry.get("alternate_urls", [])) or "a newer record"
        raise DownloadError(
            f"{member} is not inside {archive} (downloaded from {entry['url']}); the archive "
            f"may have been re-published: try {elsewhere}"
        )
    return target


def _find_asset(name: str) -> tuple[dict, str | None]:
    """(asset entry, member file name or None for the asset itself)."""
    known = assets()
    if name in known:
        return known[name], None
    for entry in known.values():
        for member in entry.get("members", []):
            if name in (member, Path(member).stem):
                return entry, member
    names = sorted(known) + sorted(m for e in known.values() for m in e.get("members", []))
    raise UnknownNameError(f"no asset named {name!r}; known: {', '.join(names)}")


def _extract(archive: Path, members: list[str], folder: Path) -> None:
    """Copy the listed files out of a tar archive, matched by base name.

    Bytes are read from the archive and written to paths built here, so member names in
    the archive (absolute, '..', links) never decide where anything is written.
    """
    wanted = set(members)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                base = info.name.rsplit("/", 1)[-1]
                if not (info.isfile() and base in wanted):
                    continue
                tmp = folder / f".{base}.{os.getpid()}.tmp"
                try:
                    with tar.extractfile(info) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    os.replace(tmp, folder / base)
                finally:
                    tmp.unlink(missing_ok=True)
                wanted.discard(base)
                if not wanted:
                    break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DownloadError(
            f"cannot extract {', '.join(sorted(wanted))} from {archive} ({e}); if the archive "
            "is damaged, delete it to download it again"
        ) from e


# ---------------------------------------------------------------- downloader


class _Interrupted(Exception):
    """The body stopped early; `progressed` says whether this attempt delivered any bytes.

    Deliberately not an OSError, so it cannot be mistaken for a failed write.
    """

    def __init__(self, reason: str, progressed: bool, timed_out: bool = False):
        super().__init__(reason)
        self.progressed = progressed
        self.timed_out = timed_out


def download(
    url: str,
    dest=None,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Fetch `url` to `dest` (default: `cache_dir()`/<file name of the URL>) and return it.

    The bytes go to `<dest>.part` and are renamed to `dest` only when complete and verified,
    so `dest` existing means the file is whole. A `.part` left by an earlier try is resumed
    with a Range request. `<dest>.lock` makes parallel callers (several processes of one
    job) download once: the others wait, then find `dest`. An existing `dest` is returned
    as is. `timeout` bounds the connection and every wait for data, in seconds.
    """
    if dest is None:
        dest = cache_dir() / unquote(Path(urlparse(url).path).name)
    dest = Path(dest).expanduser()
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the folder {dest.parent} for {url}: {e}") from e

    with _file_lock(dest.with_name(dest.name + ".lock"), dest, progress):
        if dest.is_file():
            return dest
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                _fetch(url, part, progress=progress, timeout=timeout, chunk_size=chunk_size)
                break
            except _Interrupted as e:
                if e.progressed and attempt < _ATTEMPTS:
                    continue
                what = f"no data for {timeout:g} s (timed out)" if e.timed_out else str(e)
                raise DownloadError(
                    f"download of {url} stopped: {what}; the bytes received so far are kept "
                    f"in {part} and the next call resumes from there"
                ) from None
        if sha256 is not None:
            _check_sha256(part, sha256, url)
        os.replace(part, dest)
    return dest


@contextmanager
def _file_lock(lock_path: Path, dest: Path, progress: bool):
    """Hold an exclusive flock on `lock_path`; the file stays (removing it would race)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DownloadError(f"cannot create the lock file {lock_path}: {e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process downloading {dest.name} ...", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fetch(url: str, part: Path, *, progress: bool, timeout: float, chunk_size: int) -> None:
    """One request: resume or start `part`, stream the body into it."""
    have = part.stat().st_size if part.exists() else 0
    # identity: a compressed transfer would make Content-Length and Range count other bytes.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = requests.get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    except requests.Timeout as e:
        raise DownloadError(f"timed out after {timeout:g} s waiting for {url}") from e
    except requests.RequestException as e:
        raise DownloadError(f"cannot reach {url}: {e}") from e

    with resp:
        status = resp.status_code
        if status == 416 and have:  # .part is not a prefix of this file: start over
            resp.close()
            part.unlink()
            return _fetch(url, part, progress=progress, timeout=timeout, chunk_size=chunk_size)
        stale = 0  # bytes of .part that this response overwrites, freeing their space
        if status == 206:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if start != have:
                resp.close()
                part.unlink()
                return _fetch(url, part, progress=progress, timeout=timeout, chunk_size=chunk_size)
            mode = "ab"
        elif status == 200:  # also a server that ignores Range: its body is the whole file
            stale, have, mode = have, 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if resp.headers.get("Content-Encoding", "identity") != "identity":
                total = None  # it compressed anyway: the length counts other bytes
        else:
            reason = f" {resp.reason}" if resp.reason else ""
            raise DownloadError(f"HTTP {status}{reason} for {url}")

        if total is not None:
            free = shutil.disk_usage(part.parent).free + stale
            if free < total - have:
                raise DownloadError(
                    f"disk full: {url} needs {total - have} more bytes in {part.parent}, "
                    f"which has {free} free"
                )

        written = 0
        try:
            with open(part, mode) as f, tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name[: -len(".part")],
                disable=not progress,
            ) as bar:
                try:
                    for chunk in _body(resp, chunk_size):
                        f.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
                except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
                    timed_out = isinstance(
                        e, (requests.Timeout, urllib3.exceptions.TimeoutError)
                    ) or "timed out" in str(e).lower()
                    raise _Interrupted(f"connection lost ({e})", written > 0, timed_out) from None
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # open, write, flush, fsync, close: all about the local disk
            raise _write_error(e, url, part) from e

    if total is not None and have + written != total:
        raise _Interrupted(f"got {have + written} of {total} bytes", written > 0)


def _body(resp, chunk_size: int):
    """The body as it arrives, up to `chunk_size` bytes at a time.

    read1 hands over whatever has arrived, so when a connection drops or stalls mid-chunk the
    bytes already received reach the .part file and the resume starts after them
    (iter_content would discard the unfinished chunk).
    """
    read1 = getattr(resp.raw, "read1", None)
    if read1 is None:  # urllib3 older than 2.3
        yield from resp.iter_content(chunk_size)
        return
    while chunk := read1(chunk_size, decode_content=True):
        yield chunk


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, total size) of a `Content-Range: bytes a-b/total` header."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value)
    if not m:
        return None, None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) != "*" else None)


def _write_error(e: OSError, url: str, part: Path) -> DownloadError:
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return DownloadError(
            f"disk full while writing {part} (downloading {url}); free some space and call "
            "again: the download resumes from the bytes already written"
        )
    return DownloadError(f"cannot write {part} (downloading {url}): {e}")


def _check_sha256(part: Path, expected: str, url: str) -> None:
    """Delete the file and fail on a mismatch: a wrong file must never reach torch.load."""
    h = hashlib.sha256()
    with open(part, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    got = h.hexdigest()
    if got != expected.lower():
        part.unlink()
        raise DownloadError(
            f"sha256 mismatch for {url}: expected {expected.lower()}, got {got}; "
            "the file was deleted"
        )


# ---------------------------------------------------------------- loading


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
