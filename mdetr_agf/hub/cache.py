"""A registry name -> a local file: bundled in the package, or downloaded once into the cache."""
from __future__ import annotations

import errno
import os
import shutil
import tarfile
import zlib
from pathlib import Path

from ..errors import DownloadError, FileMissingError, UnknownNameError
from .catalog import PACKAGE_DIR, assets, get_entry, source_url
from .download import download

CACHE_ENV = "MDETR_AGF_CACHE"


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
        path = PACKAGE_DIR / entry["file"]
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
    return download(source_url(entry["url"]), path, sha256=entry.get("sha256"), progress=progress)


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
        download(source_url(entry["url"]), archive, sha256=entry.get("sha256"), progress=progress)
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



