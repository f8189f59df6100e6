"""A registry name -> a local file: bundled in the package, or downloaded once into the cache."""
from __future__ import annotations

import errno
import os
import shutil
import tarfile
import zlib
from pathlib import Path

from ..errors import CacheError, CheckpointError, DownloadError, FileMissingError, UnknownNameError
from . import limits
from .catalog import PACKAGE_DIR, assets, get_entry, source_url
from .checkpoint import slim_path
from .download import download
from .safefs import folder_problem, private_folder, safe_name
from .torch_zip import check_file

CACHE_ENV = "MDETR_AGF_CACHE"


def cache_dir(*, create: bool = True) -> Path:
    """Where downloads go: $MDETR_AGF_CACHE, else $XDG_CACHE_HOME/mdetr_agf (~/.cache/mdetr_agf).

    Created on demand (`create`), so that merely importing the package never touches the disk.
    A folder that is not one (a file), is a link, belongs to another user or is writable by
    every user is refused: files planted there would be loaded as weights. A read-only folder
    is fine for reading what it holds; only downloading into it fails.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        path, source = Path(env).expanduser(), f"${CACHE_ENV}"
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path, source = Path(base).expanduser() / "mdetr_agf", "the default cache"
    fix = f"set ${CACHE_ENV} to a folder of your own"
    if create and not path.is_dir():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) \
                else e.strerror
            raise CacheError(e.errno, f"cannot create the cache folder {path} ({source}): {why}; "
                             f"{fix}", str(path)) from None
    if not create and not os.path.lexists(path):
        existing = next(p for p in path.parents if os.path.lexists(p))
        if not existing.is_dir():
            raise CacheError(errno.ENOTDIR, f"the cache folder {path} ({source}) cannot exist: "
                             f"{existing} is a file; {fix}", str(path))
        return path
    problem = folder_problem(path)
    if problem:
        raise CacheError(errno.EPERM, f"the cache folder {path} ({source}) {problem}; "
                         "it is not used. Fix its owner and mode, or " + fix, str(path))
    return path


def resolve(name: str, checkpoint=None, *, progress: bool = True, use_ema: bool = False,
            full_download: bool = False) -> Path:
    """A local file holding the weights of model `name`.

    `checkpoint` (a path) wins when given: it must exist, since silently downloading 3 GB
    because of a typo would be worse than an error. Otherwise entries without a URL are
    bundled inside the package, and the others are fetched once into `cache_dir()`: by
    default only the weights (`"model"`, or `"model_ema"` with `use_ema`) via HTTP Range,
    kept as the file's slim copy; the whole file with `full_download`, when the server
    ignores Range, or when the entry has a sha256 (which only the whole file can match).
    A whole file is checked member by member before it is kept.
    """
    entry = get_entry(name)
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileMissingError(
                errno.ENOENT,
                f"checkpoint file for {name!r} not found; pass an existing file, or no "
                f"checkpoint to download {entry.file}",
                str(path),
            )
        return path
    if entry.url is None:
        path = PACKAGE_DIR / entry.file
        if not path.is_file():
            raise FileMissingError(
                errno.ENOENT,
                f"the weights bundled with the package for {name!r} are missing; reinstall "
                "mdetr-agf",
                str(path),
            )
        return path
    path = cache_dir() / safe_name(entry.file, f"the file name of {name!r}")
    if path.is_file():
        if not slim_path(path, use_ema).is_file():  # about to be read: a quick look first
            _drop_if_truncated(path)
        return path
    from .remote_zip import RangeUnsupported, fetch_weights  # requests and tqdm: only once something is fetched

    url = source_url(entry.url)
    if not full_download and entry.sha256 is None:
        slim = slim_path(path, use_ema)
        try:
            return slim if slim.is_file() else fetch_weights(
                url, path, slim, key="model_ema" if use_ema else "model", progress=progress)
        except RangeUnsupported:
            pass  # the full download below
    return download(url, path, sha256=entry.sha256, progress=progress,
                    check=lambda part: check_file(part, keys=("model", "model_ema")))


def _drop_if_truncated(path: Path) -> None:
    """A cached file without its central directory (or with a damaged data.pkl), e.g. a
    broken copy from elsewhere, is deleted so that the next call downloads it again."""
    try:
        check_file(path, keys=())
    except CheckpointError as e:
        path.unlink(missing_ok=True)
        raise DownloadError(f"{e}; it was deleted, the next call downloads it again") from None


def resolve_asset(name: str, *, progress: bool = True) -> Path:
    """A local copy of an asset, or of one file inside an archive asset.

    `name` is an asset's name (gives the file as published) or one of its `members`, with or
    without the extension (e.g. "gqa_answer2id_by_type"). The archive is downloaded once;
    all listed members are extracted in the same pass to `cache_dir()`/<asset>/<member>, so
    asking for the next one costs nothing.
    """
    entry, member = _find_asset(name)
    cache = cache_dir()
    archive = cache / safe_name(entry["file"], f"the file name of asset {entry['name']!r}")
    folder = cache / safe_name(entry["name"], "an asset name")
    members = [safe_name(m, f"a member of asset {entry['name']!r}") for m in entry.get("members", [])]
    target = archive if member is None else folder / member
    if target.is_file():
        return target
    if not archive.is_file():
        download(source_url(entry["url"]), archive, sha256=entry.get("sha256"), progress=progress)
    if member is None:
        return archive
    _extract(archive, members, folder)
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
    the archive (absolute, '..', links) never decide where anything is written. Each file is
    written in a private folder and renamed into place (a link planted under its name is
    replaced, never followed), and may not exceed $MDETR_AGF_MAX_MEMBER_BYTES, declared or
    written: a small archive cannot fill the disk.
    """
    cap = int(limits.MEMBER_BYTES.get())
    wanted = set(members)
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise CacheError(e.errno, f"cannot create {folder} to extract {archive}: {e.strerror}",
                         str(folder)) from None
    problem = folder_problem(folder)
    if problem:
        raise CacheError(errno.EPERM, f"{folder} {problem}; nothing was extracted into it. "
                         "Delete it to have it made again", str(folder))
    try:
        with tarfile.open(archive, "r:*") as tar, private_folder(folder) as tmp:
            for info in tar:
                base = info.name.rsplit("/", 1)[-1]
                if not (info.isfile() and base in wanted):
                    continue
                _check_member_size(info.size, cap, archive, info.name, folder)
                with tar.extractfile(info) as src, open(tmp / base, "xb") as dst:
                    _copy_at_most(src, dst, cap, archive, info.name)
                os.replace(tmp / base, folder / base)
                wanted.discard(base)
                if not wanted:
                    break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if isinstance(e, DownloadError):
            raise
        raise DownloadError(
            f"cannot extract {', '.join(sorted(wanted))} from {archive} ({e}); if the archive "
            "is damaged, delete it to download it again"
        ) from e


def _check_member_size(size: int, cap: int, archive: Path, member: str, folder: Path) -> None:
    if size > cap:
        raise DownloadError(
            f"{member} in {archive} declares {size} bytes, more than the limit of {cap} "
            f"(${limits.MEMBER_BYTES.env}); nothing was extracted. Delete the archive if it is "
            "not the published one; raise the limit only if you trust it"
        )
    free = shutil.disk_usage(folder).free
    if size > free:
        raise DownloadError(f"disk full: {member} in {archive} needs {size} bytes in {folder}, "
                            f"which has {free} free")


def _copy_at_most(src, dst, cap: int, archive: Path, member: str) -> None:
    """Copy, counting: a member that streams more than `cap` bytes is cut off and refused."""
    written = 0
    while block := src.read(min(1 << 20, cap + 1 - written)):
        written += len(block)
        if written > cap:
            raise DownloadError(
                f"{member} in {archive} streamed more than the limit of {cap} bytes "
                f"(${limits.MEMBER_BYTES.env}); nothing was extracted"
            )
        dst.write(block)
