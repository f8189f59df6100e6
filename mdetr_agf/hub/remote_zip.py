"""Fetch only the weights of a checkpoint over HTTP Range, straight into its slim copy.

A Zenodo file is 2.4-3 GB, three quarters of it optimizer state and an EMA copy that a load
never reads. The zip's tail (central directory) and data.pkl say where the storages of
``"model"`` lie; only those byte ranges are fetched, coalesced into few requests, into
``<slim>.part`` (append-only, so a later call resumes it), CRC-checked member by member, and
written as the same slim safetensors copy a full file would give.
"""
from __future__ import annotations

import bisect
import io
import os
import shutil
import time
from pathlib import Path

import requests
import urllib3
from tqdm.auto import tqdm

from ..errors import CheckpointError, DownloadError
from . import limits
from .checkpoint import _plain_args, _tensors, save_slim
from .download import _ATTEMPTS, _body, _content_range, _file_lock, _Interrupted, _write_error
from .safefs import open_own
from .torch_zip import Archive, TensorRecord, Unsupported, storages

# First read: the end of the file, where the central directory lives; enough for zipfile's
# search of the end record behind a maximal comment.
TAIL = (1 << 16) + 128
READ_AHEAD = 1 << 16  # smallest metadata read, so zipfile's small reads cost one request
MAX_GAP = 1 << 20  # a gap this small costs less to fetch than one more request ...
OVERHEAD = 0.1  # ... as long as all bridged gaps stay under this fraction of the bytes wanted


class RangeUnsupported(Exception):
    """The server answered a Range request with the whole file, or the file's layout needs
    torch's own loader: the full download is the way."""


def fetch_weights(url: str, dest: Path, slim: Path, *, key: str = "model", progress: bool = True,
                  timeout: float = 30.0, chunk_size: int = 1 << 20) -> Path:
    """Write `slim` (weights of entry `key` and the training args) from the checkpoint at `url`.

    `dest` is where the full file would go; its lock is taken, so parallel callers fetch once
    and never alongside a full download of the same file. Raises RangeUnsupported when only
    a full download can help.
    """
    with _file_lock(dest.with_name(dest.name + ".lock"), dest, progress, limits.LOCK_WAIT.get()):
        if slim.is_file():
            return slim
        part = slim.with_name(slim.name + ".part")
        with requests.Session() as session, \
                RemoteFile(session, url, timeout=timeout, chunk_size=chunk_size) as remote:
            try:
                archive = Archive(remote, url)
            except CheckpointError as e:  # no central directory: not a zip, or a damaged one
                raise RangeUnsupported(str(e)) from None
            try:
                # data.pkl (and the byte-order mark beside it): one request
                remote.prefetch([archive.span(n) for n in ("data.pkl", "byteorder") if archive.has(n)])
                entries = archive.entries()
            except Unsupported as e:
                raise RangeUnsupported(f"{url} holds {e}") from None
            except CheckpointError as e:
                raise DownloadError(f"{e}; call again to fetch it anew") from None
            if key not in entries:
                raise CheckpointError(
                    f"{url} has no {key!r} entry (use_ema={key == 'model_ema'}); its entries: "
                    f"{', '.join(sorted(map(str, entries)))}"
                )
            plan = coalesce(archive.span(archive.storage_member(s)) for s in storages(entries[key]))
            remote.fetch_into(part, plan, progress=progress, desc=dest.name)
            try:
                state = _tensor_tree(entries[key], archive, {})
            except CheckpointError as e:
                part.unlink(missing_ok=True)
                raise DownloadError(
                    f"{e}; the bytes fetched were deleted, the next call fetches them again"
                ) from None
            try:
                save_slim(slim, _tensors(state, url, key), _plain_args(entries.get("args"), url), key,
                          {"source_url": url, "source_size": str(remote.size)})
            except (CheckpointError, DownloadError):
                raise
            except Exception as e:  # OSError, or safetensors' own error type for I/O failures
                raise DownloadError(f"cannot write the weights of {url} to {slim}: {e}") from e
            del state
        part.unlink(missing_ok=True)
    return slim


def _tensor_tree(state, archive: Archive, cache: dict):
    if not isinstance(state, dict):
        return state  # _tensors says what is wrong with it
    return {k: archive.tensor(v, cache) if isinstance(v, TensorRecord) else v
            for k, v in state.items()}


def coalesce(spans, max_gap: int = MAX_GAP, overhead: float = OVERHEAD) -> list[tuple[int, int]]:
    """Sorted byte ranges, neighbours merged: a request costs more than a small gap.

    Gaps are bridged smallest first while each is under `max_gap` and all bridged bytes stay
    under `overhead` times the bytes wanted, so the few requests never cost much extra.
    """
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    budget = overhead * sum(end - start for start, end in merged)
    gaps = sorted(range(len(merged) - 1), key=lambda i: merged[i + 1][0] - merged[i][1])
    bridged = set()
    for i in gaps:
        gap = merged[i + 1][0] - merged[i][1]
        if gap > max_gap or gap > budget:
            break
        budget -= gap
        bridged.add(i)
    out: list[tuple[int, int]] = []
    for i, (start, end) in enumerate(merged):
        if i - 1 in bridged:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


class RemoteFile(io.RawIOBase):
    """A file on an HTTP server, readable and seekable for zipfile.

    Bytes come from what is already known (the tail, prefetched ranges held in memory, the
    ranges fetched into the .part file) or, for a read outside them, from one more Range
    request. Redirects are followed; the address they lead to is reused while it answers.
    """

    def __init__(self, session, url: str, *, timeout: float, chunk_size: int = 1 << 20):
        super().__init__()
        self.session, self.origin, self.url = session, url, url
        self.timeout, self.chunk_size = timeout, chunk_size
        self.deadline = limits.DOWNLOAD_DEADLINE.get()  # for the whole call, as downloads
        self.stop_at = time.monotonic() + self.deadline
        self.pos = 0
        self.known: list[tuple[int, int, object]] = []  # (start, end, bytes or part offset)
        self.part = None
        try:
            resp, head = self._get(f"bytes=-{TAIL}"), False
        except RangeUnsupported:  # some servers know ranges from a first byte only
            resp, head = self._get(f"bytes=0-{READ_AHEAD - 1}"), True
        start, total = _content_range(resp.headers.get("Content-Range", ""))
        if start is None or total is None:
            resp.close()
            raise RangeUnsupported(f"{url} answered a Range request without a usable Content-Range")
        self.size = total
        self._add(start, self._collect(start, min(READ_AHEAD, total) if head else total, resp))

    # ---- file protocol (what zipfile uses)
    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=0):
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self.pos = base + offset
        return self.pos

    def read(self, n=-1):
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        out = []
        while self.pos < end:
            chunk = self._known(self.pos, end)
            if chunk is None:  # one request for this read and a little beyond, up to known bytes
                stop = min(self._next_known(self.pos), max(end, self.pos + READ_AHEAD))
                self.prefetch([(self.pos, stop)])
                continue
            out.append(chunk)
            self.pos += len(chunk)
        return b"".join(out)

    def close(self):
        if self.part is not None:
            self.part.close()
            self.part = None
        super().close()

    # ---- what is known
    def _add(self, start, data):
        bisect.insort(self.known, (start, start + len(data), data), key=lambda k: k[0])

    def _known(self, pos, end):
        for start, stop, where in self.known:
            if start <= pos < stop:
                stop = min(stop, end)
                if isinstance(where, int):  # in the .part file at that offset
                    self.part.seek(where + pos - start)
                    data = self.part.read(stop - pos)
                    if not data:
                        raise CheckpointError(f"{self.part.name} lost bytes while being read")
                    return data
                return where[pos - start: stop - start]
        return None

    def _next_known(self, pos):
        return min([s for s, _, _ in self.known if s > pos], default=self.size)

    def prefetch(self, spans):
        """Fetch byte ranges into memory (metadata: a few hundred KB at most)."""
        missing = [(a, b) for a, b in spans
                   if not any(s <= a and b <= e for s, e, _ in self.known)]
        for start, end in coalesce(missing, overhead=1.0):
            resp = self._get(f"bytes={start}-{end - 1}")
            self._check_start(resp, start)
            self._add(start, self._collect(start, end, resp))

    # ---- HTTP
    def _get(self, byte_range: str):
        headers = {"Accept-Encoding": "identity", "Range": byte_range}
        for url in dict.fromkeys([self.url, self.origin]):  # the redirect target, then the origin
            try:
                resp = self.session.get(url, headers=headers, stream=True,
                                        timeout=(self.timeout, self.timeout))
            except requests.Timeout as e:
                raise DownloadError(f"timed out after {self.timeout:g} s waiting for {url}") from e
            except requests.RequestException as e:
                raise DownloadError(f"cannot reach {url}: {e}") from e
            if resp.status_code == 206:
                self.url = resp.url
                return resp
            resp.close()
            if resp.status_code == 200:
                raise RangeUnsupported(f"{url} ignores Range requests")
            if resp.status_code < 400:
                break
        reason = f" {resp.reason}" if resp.reason else ""
        raise DownloadError(f"HTTP {resp.status_code}{reason} for {self.origin}")

    def _check_start(self, resp, start):
        got, total = _content_range(resp.headers.get("Content-Range", ""))
        if got != start or total != self.size:
            resp.close()
            raise DownloadError(
                f"{self.origin} answered bytes {got} of {total} when asked for byte {start} of "
                f"{self.size}: the file changed on the server; call again"
            )

    def _stream(self, start, end, resp, sink):
        """Bytes [start, end) into `sink`, starting with `resp`. A dropped connection that
        delivered bytes is resumed from the next byte (up to _ATTEMPTS tries, as downloads)."""
        pos = start
        for attempt in range(1, _ATTEMPTS + 1):
            received = 0
            try:
                with resp:
                    for chunk in _body(resp, self.chunk_size):
                        if time.monotonic() > self.stop_at:
                            raise _Interrupted(
                                f"it took longer than the limit of {self.deadline:g} s "
                                f"(${limits.DOWNLOAD_DEADLINE.env}; raise it for a slow link)",
                                False)
                        chunk = chunk[: end - pos]
                        sink(chunk)
                        pos += len(chunk)
                        received += len(chunk)
                        if pos >= end:
                            break
            except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
                timed_out = isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError)) \
                    or "timed out" in str(e).lower()
                why = f"no data for {self.timeout:g} s (timed out)" if timed_out else f"connection lost ({e})"
                failure = _Interrupted(why, received > 0)
            else:
                if pos >= end:
                    return
                failure = _Interrupted(f"got {pos - start} of {end - start} bytes", received > 0)
            if not failure.progressed or attempt == _ATTEMPTS:
                raise failure
            resp = self._get(f"bytes={pos}-{end - 1}")
            self._check_start(resp, pos)

    def _collect(self, start, end, resp) -> bytes:
        chunks = []
        try:
            self._stream(start, end, resp, chunks.append)
        except _Interrupted as e:
            raise DownloadError(f"reading {self.origin} stopped: {e}") from None
        return b"".join(chunks)

    def fetch_into(self, part: Path, plan, *, progress: bool, desc: str) -> None:
        """The ranges of `plan`, in order, appended to `part`; what `part` already holds (an
        earlier call's) is not fetched again. Then reads of those ranges come from `part`."""
        total = sum(end - start for start, end in plan)
        have = part.stat().st_size if part.exists() else 0
        if have > total:  # from another plan (the file changed): start over
            part.unlink()
            have = 0
        free = shutil.disk_usage(part.parent).free
        if free < total - have:
            raise DownloadError(
                f"disk full: the weights in {self.origin} need {total - have} more bytes in "
                f"{part.parent}, which has {free} free"
            )
        try:
            with open_own(part, "ab") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                             unit_divisor=1024, desc=desc, disable=not progress) as bar:
                def sink(chunk):
                    f.write(chunk)
                    bar.update(len(chunk))

                done = 0
                for start, end in plan:
                    first = start + max(0, have - done)
                    done += end - start
                    if first >= end:
                        continue
                    resp = self._get(f"bytes={first}-{end - 1}")
                    self._check_start(resp, first)
                    try:
                        self._stream(first, end, resp, sink)
                    except _Interrupted as e:
                        raise DownloadError(
                            f"download of the weights in {self.origin} stopped: {e}; the bytes "
                            f"received so far are kept in {part} and the next call resumes from there"
                        ) from None
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if isinstance(e, DownloadError):
                raise
            raise _write_error(e, self.origin, part) from e
        self.part = open(part, "rb")
        offset = 0
        for start, end in plan:
            self.known.append((start, end, offset))
            offset += end - start
        self.known.sort(key=lambda k: k[0])
