"""HTTP downloads into the cache: resumable, locked against parallel callers, verified.

The Zenodo files are 0.4–3 GB, so a dropped connection resumes with a Range request instead of
restarting, and a file appears under its final name only once it is whole. requests, urllib3
and tqdm are imported by the functions that fetch, so importing the hub costs none of them.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import CheckpointError, DownloadError
from . import limits
from .safefs import PlantedFileError, open_own, safe_name

try:  # POSIX only; elsewhere concurrent downloads of one file are simply not coordinated.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

# Tries per download call: a dropped connection that delivered bytes is resumed at once, so a
# flaky link costs a retry, not the whole file. Attempts that deliver nothing are not retried.
_ATTEMPTS = 3


class _Interrupted(Exception):
    """The body stopped early; `progressed` says whether this attempt delivered any bytes.

    Deliberately not an OSError, so it cannot be mistaken for a failed write.
    """

    def __init__(self, reason: str, progressed: bool, timed_out: bool = False,
                 over_deadline: bool = False):
        super().__init__(reason)
        self.progressed = progressed
        self.timed_out = timed_out
        self.over_deadline = over_deadline


def download(
    url: str,
    dest=None,
    *,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 30.0,
    deadline: float | None = None,
    lock_wait: float | None = None,
    chunk_size: int = 1 << 20,
    check=None,
) -> Path:
    """Fetch `url` to `dest` (default: `cache_dir()`/<file name of the URL>) and return it.

    The bytes go to `<dest>.part` and are renamed to `dest` only when complete and verified,
    so `dest` existing means the file is whole. A `.part` left by an earlier try is resumed
    with a Range request. `<dest>.lock` makes parallel callers (several processes of one
    job) download once: the others wait, then find `dest`. An existing `dest` is returned
    as is. `timeout` bounds the connection and every wait for data, in seconds; `deadline`
    the whole call ($MDETR_AGF_DOWNLOAD_DEADLINE, default 4 h); `lock_wait` how long to wait
    for another process's lock while it writes nothing ($MDETR_AGF_LOCK_WAIT, default 600 s).
    `check` (a function of the complete file raising CheckpointError) vets it before the
    rename: a damaged file is deleted, and the next call downloads it again.
    """
    deadline = limits.DOWNLOAD_DEADLINE.get(deadline)
    lock_wait = limits.LOCK_WAIT.get(lock_wait)
    if dest is None:
        from .cache import cache_dir

        name = unquote(Path(urlparse(url).path).name)
        dest = cache_dir() / safe_name(name, f"the file name {Path(urlparse(url).path).name!r} "
                                              f"of {url}, decoded,", hint="pass dest=")
    dest = Path(dest).expanduser()
    if dest.is_file():  # also in a read-only folder, where no lock file can be made
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the folder {dest.parent} for {url}: {e}") from e

    with _file_lock(dest.with_name(dest.name + ".lock"), dest, progress, lock_wait):
        if dest.is_file():
            return dest
        stop_at = time.monotonic() + deadline
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                _fetch(url, part, progress=progress, timeout=timeout, chunk_size=chunk_size,
                       stop_at=stop_at)
                break
            except _Interrupted as e:
                if e.progressed and attempt < _ATTEMPTS and not e.over_deadline:
                    continue
                what = f"no data for {timeout:g} s (timed out)" if e.timed_out else str(e)
                if e.over_deadline:
                    what = (f"it took longer than the limit of {deadline:g} s "
                            f"(${limits.DOWNLOAD_DEADLINE.env}; raise it for a slow link)")
                raise DownloadError(
                    f"download of {url} stopped: {what}; the bytes received so far are kept "
                    f"in {part} and the next call resumes from there"
                ) from None
        if sha256 is not None:
            _check_sha256(part, sha256, url)
        if check is not None:
            try:
                check(part)
            except CheckpointError as e:
                part.unlink(missing_ok=True)
                raise DownloadError(
                    f"the download of {dest.name} from {url} is damaged ({e}); it was deleted, "
                    "the next call downloads it again"
                ) from None
        os.replace(part, dest)
    return dest


@contextmanager
def _file_lock(lock_path: Path, dest: Path, progress: bool, wait: float):
    """Hold an exclusive flock on `lock_path`; the file stays (removing it would race).

    The holder writes its pid into the file. A waiter gives up once the holder has written
    nothing to `<dest>.part` for `wait` seconds, naming the lock file and that pid.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    try:
        f = open_own(lock_path, "r+b")
    except OSError as e:
        raise DownloadError(f"cannot create the lock file {lock_path} ({e.strerror or e}): "
                            f"{_unwritable_hint(dest.parent)}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"waiting for another process downloading {dest.name} ...", file=sys.stderr)
            _wait_for_lock(f, lock_path, _parts_of(dest), wait)
        f.truncate(0)
        f.write(f"{os.getpid()}\n".encode())
        f.flush()
        yield  # closing the file releases the lock


def _parts_of(dest: Path) -> list[Path]:
    """The files a holder of `dest`'s lock writes to: the whole file's .part, or those of the
    weights-only fetch (one per slim copy)."""
    from .checkpoint import slim_path

    return [p.with_name(p.name + ".part") for p in (dest, slim_path(dest), slim_path(dest, True))]


def _wait_for_lock(f, lock_path: Path, parts: list[Path], wait: float) -> None:
    part = parts[0]

    def activity():
        stats = []
        for p in parts:
            try:
                st = os.lstat(p)
                stats.append((st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append(None)
        return stats

    last, idle_since = activity(), time.monotonic()
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        now = activity()
        if now != last:
            last, idle_since = now, time.monotonic()
        elif time.monotonic() - idle_since > wait:
            f.seek(0)
            holder = f.read(32).decode("ascii", "replace").strip() or "unknown"
            raise DownloadError(
                f"gave up waiting for the lock file {lock_path}: the process holding it (pid "
                f"{holder}) has written nothing to {part.name} (nor to a weights-only .part) for {wait:g} s "
                f"(${limits.LOCK_WAIT.env}). If that process is hung, stop it and call again; "
                "if it is only slow, raise the limit"
            )
        time.sleep(min(0.2, wait / 4))


def _unwritable_hint(folder: Path) -> str:
    return (f"the folder {folder} is not writable (a read-only mount?); set $MDETR_AGF_CACHE "
            "to a writable folder, or pass the file you already have")


def _fetch(url: str, part: Path, *, progress: bool, timeout: float, chunk_size: int,
           stop_at: float) -> None:
    """One request: resume or start `part`, stream the body into it until `stop_at`."""
    left = stop_at - time.monotonic()
    if left <= 0:
        raise _Interrupted("deadline", False, over_deadline=True)
    have = part.stat().st_size if part.exists() else 0
    from .watchdog import Watchdog, watched_session

    with Watchdog(left) as dog, watched_session() as session:
        try:
            _fetch_once(session, url, part, have, progress=progress, timeout=min(timeout, left),
                        chunk_size=chunk_size)
            cut = None
        except (DownloadError, _Interrupted) as e:
            cut = e
        except _Restart:
            cut = _Restart
        if dog.fired:  # even a body that seemed to end: without a length, a cut looks like one
            raise _Interrupted("deadline", part.exists() and part.stat().st_size > have,
                               over_deadline=True) from None
        if cut is None:
            return
        if cut is not _Restart:
            raise cut
    return _fetch(url, part, progress=progress, timeout=timeout, chunk_size=chunk_size,
                  stop_at=stop_at)


class _Restart(Exception):
    """The `.part` was not a prefix of the file: it is deleted, and the fetch starts over."""


def _fetch_once(session, url: str, part: Path, have: int, *, progress: bool, timeout: float,
                chunk_size: int) -> None:
    import requests
    import urllib3
    from tqdm.auto import tqdm

    # identity: a compressed transfer would make Content-Length and Range count other bytes.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    except requests.Timeout as e:
        raise DownloadError(f"timed out after {timeout:g} s waiting for {url}") from e
    except requests.RequestException as e:
        raise DownloadError(f"cannot reach {url}: {e}") from e

    with resp:
        status = resp.status_code
        if status == 416 and have:  # .part is not a prefix of this file: start over
            resp.close()
            part.unlink()
            raise _Restart
        stale = 0  # bytes of .part that this response overwrites, freeing their space
        if status == 206:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if start != have:
                resp.close()
                part.unlink()
                raise _Restart
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
            with open_own(part, mode) as f, tqdm(
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
    if isinstance(e, PlantedFileError):
        return DownloadError(f"{e.strerror or e} (downloading {url})")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DownloadError(f"cannot write {part} (downloading {url}): "
                             f"{_unwritable_hint(part.parent)}")
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
