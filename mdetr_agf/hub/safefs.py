"""Creating files in a folder others may share, without ever writing through a planted link.

A cache on a cluster can be reached by other users. Files the package keeps across calls
(a resumable `.part`, a lock) are opened with O_NOFOLLOW and must be plain, singly linked files
of their own; everything else is written in a private (0700) temporary folder and renamed into
place, so a link or file planted under the final or temporary name is never opened.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class PlantedFileError(OSError):
    """The path holds a link, a folder or another's file where the package keeps its own."""


def folder_problem(path: Path) -> str | None:
    """Why `path` is no folder to keep files in, or None: it must be a real folder (not a link
    to one), owned by this user and not writable by others."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link (to a folder someone else may control)"
    if not stat.S_ISDIR(st.st_mode):
        return "is a file, not a folder"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"is owned by another user (uid {st.st_uid}, you are uid {os.getuid()})"
    if st.st_mode & stat.S_IWOTH:
        return f"is writable by every user (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def open_own(path: Path, mode: str):
    """Open a file the package keeps under a fixed name ('ab' to resume, 'wb' to start over,
    'r+b' for a lock), refusing a link, a non-file or a file with other hard links."""
    flags = {"ab": os.O_WRONLY | os.O_APPEND | os.O_CREAT, "wb": os.O_WRONLY | os.O_CREAT,
             "r+b": os.O_RDWR | os.O_CREAT}[mode] | _NOFOLLOW | _CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if os.path.islink(path):
            raise PlantedFileError(
                e.errno, f"{path} is a symbolic link (to {os.readlink(path)}); it was not "
                "followed. Delete it if you did not make it on purpose", str(path)) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "not a plain file" if not stat.S_ISREG(st.st_mode) else \
            f"a file with {st.st_nlink} hard links (another name points at its bytes)"
        raise PlantedFileError(f"{path} is {what}; it was not written. Delete it")
    if mode == "wb":
        os.ftruncate(fd, 0)
    return os.fdopen(fd, mode if mode != "wb" else "wb")


@contextmanager
def private_folder(parent: Path):
    """A fresh 0700 folder inside `parent`, removed afterwards; rename results out of it."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def safe_name(name, what: str, hint: str = "fix the registry entry") -> str:
    """`name` if it is a plain file name; one that could leave its folder is refused.

    Names come from URLs (percent-decoded) and registry entries, so `..%2F` or a `/` must
    never reach a path join with the cache.
    """
    if not isinstance(name, str) or name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        raise InputError(
            f"{what} {name!r} is not a plain file name (it must not be empty, '.' or '..', nor "
            f"contain '/', '\\' or NUL); nothing was written: {hint}"
        )
    return name
